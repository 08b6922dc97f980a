"""Structural removal of maps from a chain of conv modules (the ``fcn`` architecture).

A prunable model here is what ``fcn`` builds: ``model.blocks`` a sequence of conv modules,
each with children ``conv`` (``nn.Conv2d``) and ``bn`` (``nn.BatchNorm2d``, or an identity
once folded), followed by ``model.head`` (an ``nn.Conv2d``). Removing output map j of module L
removes row j of its convolution's weights and bias, entry j of its batch norm (scale, shift,
running mean and variance) and input channel j of the next convolution (module L + 1's, or the
head's after the last module). Tensors are sliced in place, so the modules keep their classes,
hooks and state-dict keys. Models of other shapes (skips, concatenations) are refused here:
:mod:`mapsim.pruning.graph` prunes them through Torch-Pruning's dependency graph; this module
is its fallback for fcn chains when Torch-Pruning is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mapsim.errors import ModelError


def chain(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.Module]]:
    """``[(path, conv, bn), ...]`` of the conv modules of an fcn-shaped ``model``.

    :raises ModelError: the model is not a chain of conv modules followed by a conv head.
    """
    blocks = getattr(model, "blocks", None)
    head = getattr(model, "head", None)
    if not isinstance(blocks, nn.Sequential) or not isinstance(head, nn.Conv2d):
        raise ModelError(
            f"cannot prune a {type(model).__name__}: pruning supports fcn-shaped models only "
            "(a 'blocks' sequence of conv modules and a conv 'head'); use architecture: "
            "{name: fcn, ...}."
        )
    out = []
    for index, block in enumerate(blocks):
        conv, bn = getattr(block, "conv", None), getattr(block, "bn", None)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, (nn.BatchNorm2d, nn.Identity)) \
                or conv.groups != 1:
            raise ModelError(f"cannot prune blocks.{index}: it is not a conv module (Conv2d "
                             "-> BatchNorm2d -> ReLU with groups=1)")
        out.append((f"blocks.{index}", conv, bn))
    return out


def next_conv(model: nn.Module, index: int) -> nn.Conv2d:
    """The convolution that reads the output maps of conv module ``index``."""
    blocks = model.blocks
    return blocks[index + 1].conv if index + 1 < len(blocks) else model.head


def _slice_param(module: nn.Module, name: str, keep: torch.Tensor, dim: int) -> None:
    value = getattr(module, name)
    if value is None:
        return
    sliced = value.detach().index_select(dim, keep).clone()
    if isinstance(value, nn.Parameter):
        setattr(module, name, nn.Parameter(sliced, requires_grad=value.requires_grad))
    else:
        setattr(module, name, sliced)


@torch.no_grad()
def remove_maps(model: nn.Module, index: int, keep: Sequence[int]) -> None:
    """Keep only the output maps ``keep`` (original indices, any order: sorted here) of conv
    module ``index``, in place, and the matching input channels of the next convolution.

    :raises ValueError: no map kept, or an index out of range.
    """
    _, conv, bn = chain(model)[index]
    keep = sorted(set(int(k) for k in keep))
    n = conv.out_channels
    if not keep:
        raise ValueError(f"blocks.{index}: every map would be removed, which disconnects the "
                         "network; keep at least one")
    if keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"blocks.{index}: map indices must be in [0, {n}), got {keep}")
    idx = torch.tensor(keep, dtype=torch.long, device=conv.weight.device)
    _slice_param(conv, "weight", idx, 0)
    _slice_param(conv, "bias", idx, 0)
    conv.out_channels = len(keep)
    if isinstance(bn, nn.BatchNorm2d):
        for name in ("weight", "bias", "running_mean", "running_var"):
            _slice_param(bn, name, idx, 0)
        bn.num_features = len(keep)
    following = next_conv(model, index)
    _slice_param(following, "weight", idx, 1)
    following.in_channels = len(keep)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (every tensor in ``model.parameters()``)."""
    return sum(p.numel() for p in model.parameters())
