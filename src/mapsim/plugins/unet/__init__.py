"""A U-Net, registered as the architecture ``unet``.

An encoder of ``depth`` levels, each a block of two conv modules (Conv2d 3x3 with padding 1 ->
BatchNorm2d -> ReLU) followed by a 2x2 max pooling; a bottleneck block; a decoder that
upsamples (``bilinear``: bilinear x2 then a 1x1 conv; ``transposed``: a 2x2 transposed conv,
stride 2), concatenates the encoder block of the same resolution (the skip connection) and
applies a block; a 1x1 conv head with ``classes`` score maps. Level ``i`` has
``width * 2**i`` maps at 1/2**i of the input's size; the bottleneck has ``width * 2**depth``
maps at 1/2**depth. Inputs must have a height and width divisible by ``2**depth``.

Module paths (stable; tests/test_unet.py pins them):

=========================  ==================================================================
``encoder.{i}``            encoder block ``i`` (0: full resolution), ``width*2**i`` maps at
                           1/2**i of the input size, before pooling
``encoder.{i}.{j}``        its conv module ``j`` (0 or 1), with ``.conv``, ``.bn``, ``.relu``
``down.{i}``               the 2x2 max pooling after ``encoder.{i}`` (1/2**(i+1))
``bottleneck``             the deepest block: ``width*2**depth`` maps at 1/2**depth
``up.{i}``                 the upsampling into level ``i``: ``width*2**i`` maps at 1/2**i
                           (``up.{i}.conv`` for bilinear; a ConvTranspose2d for transposed)
``decoder.{i}``            decoder block ``i``, after the skip from ``encoder.{i}``: the same
                           size and number of maps as ``encoder.{i}``; ``decoder.0`` is the
                           last block, at full resolution (the decoder runs from
                           ``decoder.{depth-1}`` down to ``decoder.0``)
``head``                   the final 1x1 conv: ``classes`` score maps at full resolution
=========================  ==================================================================

So ``encoder.{i}`` and ``decoder.{i}`` compare map for map without alignment, and any other
pair (e.g. ``encoder.0`` and ``bottleneck``, or a U-Net layer and an ``fcn`` layer) needs
``engine.align``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

import mapsim
from mapsim import hookimpl


class ConvModule(nn.Sequential):
    """Conv2d 3x3 (padding 1) -> BatchNorm2d -> ReLU, as children ``conv``, ``bn``, ``relu``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()


class Block(nn.Sequential):
    """Two conv modules (children ``0`` and ``1``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvModule(in_channels, out_channels),
                         ConvModule(out_channels, out_channels))


class BilinearUp(nn.Module):
    """Bilinear x2 upsampling (``align_corners=False``), then a 1x1 conv (``conv``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(x)


class UNet(nn.Module):
    """See the module docstring for the structure and module paths."""

    def __init__(self, depth: int = 3, width: int = 16, upsampling: str = "bilinear",
                 in_channels: int = 1, classes: int = 2) -> None:
        super().__init__()
        self.depth = depth
        sizes = [width * 2 ** i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(
            Block(in_channels if i == 0 else sizes[i - 1], sizes[i]) for i in range(depth))
        self.down = nn.ModuleList(nn.MaxPool2d(2) for _ in range(depth))
        self.bottleneck = Block(sizes[depth - 1], sizes[depth])
        if upsampling == "bilinear":
            self.up = nn.ModuleList(BilinearUp(sizes[i + 1], sizes[i]) for i in range(depth))
        else:
            self.up = nn.ModuleList(nn.ConvTranspose2d(sizes[i + 1], sizes[i], 2, stride=2)
                                    for i in range(depth))
        self.decoder = nn.ModuleList(Block(2 * sizes[i], sizes[i]) for i in range(depth))
        self.head = nn.Conv2d(sizes[0], classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores (N, classes, H, W) for inputs (N, in_channels, H, W); H and W must be
        divisible by 2**depth."""
        step = 2 ** self.depth
        if x.dim() != 4 or x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(
                f"the unet of depth {self.depth} needs inputs whose height and width are "
                f"divisible by {step}, got {tuple(x.shape[-2:])}; crop or resize the images "
                f"(e.g. to {max(step, x.shape[-2] // step * step)} x "
                f"{max(step, x.shape[-1] // step * step)}) or use a smaller depth")
        skips = []
        for block, down in zip(self.encoder, self.down):
            x = block(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for i in reversed(range(self.depth)):
            x = self.decoder[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)


class UNetArchitecture(mapsim.Architecture):
    """A U-Net: ``depth`` levels of conv-BN-ReLU blocks, skips, a 1x1 conv head."""

    name = "unet"

    class Params(mapsim.Params):
        """Parameters of ``unet``."""

        depth: int = Field(3, ge=1, le=6, description="levels of downsampling (inputs must be "
                           "divisible by 2**depth)")
        width: int = Field(16, ge=1, description="maps of the first level (doubled per level)")
        upsampling: Literal["bilinear", "transposed"] = Field(
            "bilinear", description="bilinear x2 + 1x1 conv, or a 2x2 transposed conv")
        in_channels: int = Field(1, ge=1, description="input image channels")
        classes: int = Field(2, ge=1, description="output maps of the head")

    def build(self) -> UNet:
        """A new U-Net with PyTorch's default initialisation."""
        p = self.params
        return UNet(p.depth, p.width, p.upsampling, p.in_channels, p.classes)

    def in_channels(self) -> int:
        """Number of input channels (``in_channels``)."""
        return self.params.in_channels


@hookimpl
def register_architectures(register) -> None:
    """Register the ``unet`` architecture."""
    register(UNetArchitecture)
