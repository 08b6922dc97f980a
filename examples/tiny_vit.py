"""A small vision transformer for mapsim's token maps (no downloads; random initialisation).

``build()`` returns a ViT for grayscale images: a patch embedding (a ``patch`` x ``patch``
conv with stride ``patch``), a class token, learned position embeddings (interpolated when the
image's patch grid differs from ``image_size``'s), ``depth`` pre-norm transformer blocks and a
final layer norm. Every block outputs (batch, 1 + rows * cols, dim) tokens, so with
``tokens: auto`` in a spec, ``blocks.N`` gives ``dim`` maps on the patch grid.

Module paths: ``patch_embed`` (tokens without the class token), ``blocks.0`` ...
``blocks.{depth-1}``, ``blocks.N.attn``, ``blocks.N.mlp``, ``norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) -> patch tokens (N, rows * cols, dim), row-major."""

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """See the module docstring."""

    def __init__(self, image_size: int = 128, patch: int = 8, dim: int = 32, depth: int = 2,
                 heads: int = 4, in_channels: int = 1) -> None:
        super().__init__()
        self.patch = patch
        self.grid = image_size // patch
        self.patch_embed = PatchEmbed(in_channels, dim, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, dim, self.grid, self.grid) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        pos = self.pos_embed
        if (rows, cols) != (self.grid, self.grid):
            pos = F.interpolate(pos, size=(rows, cols), mode="bilinear", align_corners=False)
        tokens = self.patch_embed(x) + pos.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.norm(self.blocks(tokens))


def build(image_size: int = 128, patch: int = 8, dim: int = 32, depth: int = 2,
          heads: int = 4, in_channels: int = 1) -> TinyViT:
    """A TinyViT (the spec's ``seed`` sets its random initialisation)."""
    return TinyViT(image_size, patch, dim, depth, heads, in_channels)
