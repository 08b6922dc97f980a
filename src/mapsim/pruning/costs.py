"""What a network costs: parameters and multiply-accumulates (MACs) per image.

MACs are counted with forward hooks on every ``nn.Conv2d``, ``nn.ConvTranspose2d`` and
``nn.Linear`` during one forward pass on an example input (one image):

- Conv2d: ``H_out * W_out * C_out * (C_in / groups) * k_h * k_w`` (each output value is a sum
  of that many products; the bias add is not counted);
- ConvTranspose2d: ``H_in * W_in * C_in * (C_out / groups) * k_h * k_w`` (each input value is
  multiplied into a k_h x k_w window of every output map of its group);
- Linear: ``(elements of the output) * in_features``.

Batch norms, activations, pooling and interpolation are not counted (they cost a few
operations per value, against hundreds per value for a convolution).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (every tensor in ``model.parameters()``)."""
    return sum(p.numel() for p in model.parameters())


def _macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    """MACs of one call on one image (the batch holds one image)."""
    if isinstance(module, nn.ConvTranspose2d):
        k = math.prod(module.kernel_size)
        return inputs[0].numel() * (module.out_channels // module.groups) * k
    if isinstance(module, nn.Conv2d):
        k = math.prod(module.kernel_size)
        return output.numel() * (module.in_channels // module.groups) * k
    return output.numel() * module.in_features


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of ``model`` for one image: ``example`` is (1, C, H, W) (see the module docs)."""
    if example.dim() != 4 or example.shape[0] != 1:
        raise ValueError(f"count_macs needs one example image (1, C, H, W), got "
                         f"{tuple(example.shape)}")
    total = [0]
    handles = [m.register_forward_hook(
        lambda mod, i, o: total.__setitem__(0, total[0] + _macs(mod, i, o)))
        for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        was = model.training
        model.eval()(example)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return total[0]


__all__ = ["count_macs", "parameter_count"]
