"""Transformer token maps: a (1, L, D) output read as D maps on the patch grid.

A vision transformer's block outputs one D-dimensional feature per token: L tokens, of which
the first few may be a class token and register tokens, the rest one per image patch in
row-major order. With a model's ``tokens`` setting, such an output becomes D maps of the
patch grid (channel ``d`` of the token at grid row ``i`` and column ``j`` is pixel ``(i, j)``
of map ``d``), so transformer channels and CNN maps are compared with the same metrics.

The grid is ``tokens.grid`` when given; else the largest square grid ``g x g`` with
``g * g <= L`` that leaves at most :data:`MAX_INFERRED_DROP` leading tokens (so 197 tokens are
a class token and 14 x 14 patches). Give ``grid`` for non-square images. The leading
``L - rows * cols`` tokens are dropped (or ``tokens.drop``, which must agree).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mapsim.errors import LayerOutputError

#: leading (class and register) tokens that grid inference accepts
MAX_INFERRED_DROP = 8


def token_grid(n_tokens: int, tokens: Any, layer: str) -> tuple[int, int, int]:
    """``(rows, cols, dropped)`` for ``n_tokens`` tokens under a ``TokenSpec``."""
    grid, drop = getattr(tokens, "grid", None), getattr(tokens, "drop", None)
    if grid is None:
        side = math.isqrt(n_tokens - (drop or 0)) if n_tokens > (drop or 0) else 0
        rows = cols = side
        if side == 0 or (drop is not None and side * side != n_tokens - drop) or (
                drop is None and n_tokens - side * side > MAX_INFERRED_DROP):
            raise LayerOutputError(
                layer, f"layer {layer!r} gives {n_tokens} tokens, which is not a square patch "
                f"grid after {drop if drop is not None else f'at most {MAX_INFERRED_DROP}'} "
                "leading class/register tokens; give the grid: tokens: {grid: [rows, cols]}")
    else:
        rows, cols = grid
    dropped = n_tokens - rows * cols
    if dropped < 0 or (drop is not None and drop != dropped):
        raise LayerOutputError(
            layer, f"layer {layer!r} gives {n_tokens} tokens, but the grid {rows} x {cols} "
            + (f"with {drop} dropped tokens needs {rows * cols + drop}"
               if drop is not None else f"needs at least {rows * cols}")
            + "; check tokens.grid and tokens.drop (the image size decides the grid)")
    return rows, cols, dropped


def token_maps(output: torch.Tensor, tokens: Any, layer: str) -> torch.Tensor:
    """A (1, L, D) token output as (1, D, rows, cols) maps (leading tokens dropped)."""
    if output.dim() != 3:
        raise LayerOutputError(
            layer, f"layer {layer!r} gives an output of shape {tuple(output.shape)}; token "
            "maps need (batch, tokens, channels)")
    rows, cols, dropped = token_grid(int(output.shape[1]), tokens, layer)
    patches = output[:, dropped:, :]
    return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], rows, cols)
