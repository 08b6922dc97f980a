"""The study's fully convolutional network, registered as the architecture ``fcn``.

The network has ``depth`` conv modules (Conv2d -> BatchNorm2d -> ReLU, padding that keeps the
spatial size) followed by a 1x1 conv head with ``classes`` outputs. No layer changes resolution,
so every activation map has the input's height and width.

Module paths (what a spec's ``layers`` names):

=========================  ==================================================================
``blocks.0``               output of conv module 1 (after its ReLU), ``width`` maps
``blocks.{i}``             output of conv module ``i + 1``; the last is ``blocks.{depth-1}``
``blocks.{i}.conv``        the Conv2d of module ``i + 1`` (before batch norm)
``blocks.{i}.bn``          the BatchNorm2d of module ``i + 1``
``blocks.{i}.relu``        the ReLU of module ``i + 1`` (same values as ``blocks.{i}``)
``blocks``                 output of the last conv module
``head``                   the final 1x1 conv: ``classes`` score maps
=========================  ==================================================================

The study's CNN1, CNN6 and CNN10 are ``fcn`` with ``depth`` 1, 6, 10, ``width`` 64 and
``kernel_size`` 7 (their reported parameter counts, 3.3K, 1.01M and 1.81M, count the conv
modules only).
"""

from __future__ import annotations

from pydantic import Field, field_validator
from torch import Tensor, nn

import mapsim
from mapsim.core.hookspecs import hookimpl


class ConvModule(nn.Sequential):
    """Conv2d (size-preserving padding, bias) -> BatchNorm2d -> ReLU, as children
    ``conv``, ``bn`` and ``relu``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()


class FCN(nn.Module):
    """``depth`` conv modules (``self.blocks``) followed by a 1x1 conv head (``self.head``)."""

    def __init__(
        self,
        depth: int,
        width: int = 64,
        kernel_size: int = 3,
        in_channels: int = 1,
        classes: int = 2,
    ) -> None:
        super().__init__()
        modules = [
            ConvModule(in_channels if i == 0 else width, width, kernel_size) for i in range(depth)
        ]
        self.blocks = nn.Sequential(*modules)
        self.head = nn.Conv2d(width, classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores of shape (N, classes, H, W) for inputs of shape (N, in_channels, H, W)."""
        return self.head(self.blocks(x))


class FCNArchitecture(mapsim.Architecture):
    """The study's network: ``depth`` conv modules of ``width`` maps and a 1x1 conv head."""

    name = "fcn"

    class Params(mapsim.Params):
        """Parameters of ``fcn``."""

        depth: int = Field(ge=1, description="number of conv modules (CNN-N has depth N)")
        width: int = Field(64, ge=1, description="maps per conv module")
        kernel_size: int = Field(3, ge=1, description="odd kernel size of the conv modules")
        in_channels: int = Field(1, ge=1, description="input image channels")
        classes: int = Field(2, ge=1, description="output maps of the head")

        @field_validator("kernel_size")
        @classmethod
        def _odd_kernel(cls, value: int) -> int:
            if value % 2 == 0:
                raise ValueError(
                    f"kernel_size must be odd so that the padding keeps the map size "
                    f"(got {value}); use e.g. {value - 1} or {value + 1}"
                )
            return value

    def build(self) -> FCN:
        """A new FCN with PyTorch's default initialisation."""
        p = self.params
        return FCN(
            depth=p.depth,
            width=p.width,
            kernel_size=p.kernel_size,
            in_channels=p.in_channels,
            classes=p.classes,
        )

    def in_channels(self) -> int:
        """Number of input channels (``in_channels``)."""
        return self.params.in_channels


@hookimpl
def register_architectures(register) -> None:
    """Register the ``fcn`` architecture."""
    register(FCNArchitecture)
