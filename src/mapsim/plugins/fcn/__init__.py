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

Convolution algorithm (parameter ``conv``): ``direct`` always uses PyTorch's convolution;
``fft`` uses :func:`mapsim.plugins.fcn.fftconv.fft_conv2d` whenever the network runs for inference
(eval mode, gradients off) and the layer is a plain one (stride 1, dilation 1, groups 1, zero
padding, float32); ``auto`` (the default) does so only on the CPU, for kernels of 5 or more
with at least 16 input and output maps, where it measured 2-3x faster (7x7 kernels, 64 maps).
Training always uses direct convolution. The choice changes neither module paths nor
state-dict keys: every conv is still an ``nn.Conv2d`` whose hooks fire.

The study's CNN1, CNN6 and CNN10 are ``fcn`` with ``depth`` 1, 6, 10, ``width`` 64 and
``kernel_size`` 7 (their reported parameter counts, 3.3K, 1.01M and 1.81M, count the conv
modules only).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal

import torch
from pydantic import Field, field_validator, model_serializer
from torch import Tensor, nn

import mapsim
from mapsim import hookimpl
from mapsim.plugins.fcn.fftconv import fft_conv2d

ConvChoice = Literal["auto", "direct", "fft"]


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that can compute its inference forward pass with FFTs (see ``conv`` in
    the module docstring). Same parameters, state-dict keys and hooks as ``nn.Conv2d``."""

    def __init__(self, *args, conv: ConvChoice = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_algorithm = conv

    def uses_fft(self, x: Tensor) -> bool:
        """Whether the forward pass on ``x`` goes through :func:`fft_conv2d`."""
        if self.conv_algorithm == "direct" or self.training or torch.is_grad_enabled():
            return False
        plain = (
            self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and x.dim() == 4
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
        )
        if not plain or self.conv_algorithm == "fft":
            return plain
        return (
            x.device.type == "cpu"
            and min(self.kernel_size) >= 5
            and min(self.in_channels, self.out_channels) >= 16
        )

    @torch.jit.unused
    def _fft_forward(self, x: Tensor) -> Tensor:
        return fft_conv2d(x.contiguous(), self.weight, self.bias, self.padding)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Conv2d's signature
        """``nn.Conv2d.forward``, through FFTs where ``uses_fft`` says so."""
        if not torch.jit.is_scripting() and self.uses_fft(input):
            return self._fft_forward(input)
        return self._conv_forward(input, self.weight, self.bias)


class ConvModule(nn.Sequential):
    """Conv2d (size-preserving padding, bias) -> BatchNorm2d -> ReLU, as children
    ``conv``, ``bn`` and ``relu``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, conv: ConvChoice = "auto"
    ) -> None:
        super().__init__()
        self.conv = Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True, conv=conv
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
        conv: ConvChoice = "auto",
    ) -> None:
        super().__init__()
        modules = [
            ConvModule(in_channels if i == 0 else width, width, kernel_size, conv)
            for i in range(depth)
        ]
        self.blocks = nn.Sequential(*modules)
        self.head = nn.Conv2d(width, classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores of shape (N, classes, H, W) for inputs of shape (N, in_channels, H, W)."""
        return self.head(self.blocks(x))

    @torch.no_grad()
    def fuse_for_inference(self, captured: Collection[str]) -> list[str]:
        """Fold each conv module's batch norm into its convolution, for inference.

        With s = gamma / sqrt(running_var + eps) (float64), the convolution gets weights
        w s and bias (b - running_mean) s + beta, and ``bn`` becomes an identity: one pass over
        the maps less per module, and the same outputs up to float32 rounding. A module whose
        ``conv`` or ``bn`` output is in ``captured`` (module paths) keeps them, so every
        captured layer still shows what it names. Only for a network in eval mode. Returns the
        paths of the modules folded.
        """
        if self.training:
            raise ValueError("batch norms can only be folded in eval mode (call .eval())")
        wanted = set(captured)
        folded = []
        for index, block in enumerate(self.blocks):
            path = f"blocks.{index}"
            bn, conv = block.bn, block.conv
            if not isinstance(bn, nn.BatchNorm2d) or {f"{path}.conv", f"{path}.bn"} & wanted:
                continue
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            conv.weight.copy_(conv.weight.double() * scale[:, None, None, None])
            conv.bias.copy_((conv.bias.double() - bn.running_mean.double()) * scale
                            + bn.bias.double())
            block.bn = nn.Identity()
            folded.append(path)
        return folded


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
        conv: ConvChoice = Field(
            "auto",
            description="convolution algorithm for inference: auto (FFT on the CPU for kernels "
            ">= 5 and >= 16 maps), direct, or fft (whenever applicable); training is direct",
        )

        @model_serializer(mode="wrap")
        def _omit_default_conv(self, handler):
            # `conv` changes speed, not results (beyond float32 rounding): left out of dumps
            # at its default, so specs, run.json and the pretrained cards read as before
            data = handler(self)
            if isinstance(data, dict) and data.get("conv") == "auto":
                del data["conv"]
            return data

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
            conv=p.conv,
        )

    def in_channels(self) -> int:
        """Number of input channels (``in_channels``)."""
        return self.params.in_channels


@hookimpl
def register_architectures(register) -> None:
    """Register the ``fcn`` architecture."""
    register(FCNArchitecture)
