"""A segmentation network's vessel mask for one image."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from mapsim.errors import ModelError


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when ``amp``; otherwise nothing."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_scores(scores: torch.Tensor, images: torch.Tensor, name: str = "the model") -> None:
    """Check that a batch's output has two maps of the input's size.

    :raises ModelError: otherwise, saying what the output was.
    """
    n, _, h, w = images.shape
    if scores.dim() != 4 or scores.shape[0] != n or scores.shape[1] != 2 or \
            tuple(scores.shape[2:]) != (h, w):
        raise ModelError(
            f"{name} gives an output of shape {tuple(scores.shape)} for an input of shape "
            f"{tuple(images.shape)}; segmentation needs (N, 2, H, W): two maps (background, "
            "vessel) of the input's size. For fcn, set classes: 2."
        )


@torch.inference_mode()
def predict_mask(model: nn.Module, image: np.ndarray, device: torch.device | str = "cpu",
                 amp: bool = False, name: str = "the model") -> np.ndarray:
    """The boolean vessel mask of ``image`` (C, H, W): where the vessel score beats the
    background score. The model must be in eval mode and on ``device``."""
    device = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    with autocast(device, amp):
        scores = model(x)
    if not isinstance(scores, torch.Tensor):
        raise ModelError(f"{name} returned a {type(scores).__name__}, not a tensor of scores.")
    check_scores(scores, x, name)
    scores = scores.float()
    return (scores[0, 1] > scores[0, 0]).cpu().numpy()
