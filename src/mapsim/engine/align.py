"""Aligning maps of different spatial sizes onto one grid (``engine.align``).

Map-level metrics compare maps pixel by pixel, so every map of a comparison group must share
one grid. Layers at different resolutions (a U-Net's encoder and decoder, a CNN and a
transformer's patch grid) meet only when the spec says how:

* ``smaller``: every map is brought down to the smallest height and the smallest width of the
  group by area averaging (:func:`torch.nn.functional.adaptive_avg_pool2d`);
* ``larger``: up to the largest height and width, bilinear by default (``mode: nearest`` for
  nearest neighbour), with ``align_corners=False``;
* ``size: [H, W]``: to a given size; by default a map that shrinks in both directions is
  area-averaged and any other map is bilinearly resampled, unless ``mode`` says otherwise.

A map already at the target size is left exactly as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

MODES = ("area", "bilinear", "nearest")


def target_size(align: Any, shapes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The grid every map is resampled to, for ``align`` (an ``AlignSpec``) and the maps'
    (height, width) sizes."""
    shapes = list(shapes)
    if align.size is not None:
        return (int(align.size[0]), int(align.size[1]))
    pick = min if align.to == "smaller" else max
    return (pick(s[0] for s in shapes), pick(s[1] for s in shapes))


def mode_for(align: Any, shape: tuple[int, int], size: tuple[int, int]) -> str:
    """The resampling used for one map of ``shape`` brought to ``size``."""
    if align.mode is not None:
        return align.mode
    if align.to == "smaller":
        return "area"
    if align.to == "larger":
        return "bilinear"
    return "area" if shape[0] >= size[0] and shape[1] >= size[1] else "bilinear"


def resample(maps: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``maps`` (C, H, W) resampled to ``size`` with ``mode`` (area, bilinear or nearest)."""
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    x = maps[None]
    if mode == "area":
        out = F.adaptive_avg_pool2d(x, size)
    elif mode == "bilinear":
        out = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    elif mode == "nearest":
        out = F.interpolate(x, size=size, mode="nearest")
    else:
        raise ValueError(f"unknown resampling mode {mode!r}; use one of {MODES}")
    return out[0]


def align_label(align: Any, size: tuple[int, int]) -> str:
    """What the ``aligned`` column of a table row says: the choice and the resulting size,
    e.g. ``smaller/area 16x16``, ``larger/bilinear 64x64`` or ``size/auto 32x32``."""
    choice = align.to if align.size is None else "size"
    mode = align.mode or {"smaller": "area", "larger": "bilinear"}.get(choice, "auto")
    return f"{choice}/{mode} {size[0]}x{size[1]}"


def describe(align: Any) -> dict[str, Any] | None:
    """How maps were aligned, for run.json (None when they were not)."""
    if align is None:
        return None
    return {
        "to": "size" if align.size is not None else align.to,
        "size": None if align.size is None else list(align.size),
        "mode": align.mode or "auto",
        "rule": "smaller: area average to the smallest height and width; larger: bilinear "
                "(align_corners=False) or nearest to the largest; size: area where a map "
                "shrinks in both directions, else bilinear, unless mode is given",
    }
