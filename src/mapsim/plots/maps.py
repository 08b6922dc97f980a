"""Feature-map grids: a layer's maps for one image, with map ids, beside the input image."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from mapsim.errors import MapsimError


def choose_maps(n_maps: int, maps: list[int] | None = None, first: int | None = None) -> list[int]:
    """Map ids to draw: the given ids (checked), the first N, or all (at most 64)."""
    if maps:
        bad = [m for m in maps if not 0 <= m < n_maps]
        if bad:
            raise MapsimError(f"map id(s) {', '.join(map(str, bad))} out of range: the layer has "
                              f"{n_maps} maps (ids 0 to {n_maps - 1})")
        return list(dict.fromkeys(maps))
    count = min(n_maps, first if first is not None else 64)
    return list(range(count))


def maps_figure(maps: np.ndarray, ids: list[int], image: np.ndarray, dead: np.ndarray,
                title: str, shared_scale: bool = False) -> Figure:
    """A grid of ``maps[ids]`` (C,H,W) with ids; the input image first; dead maps marked.

    With ``shared_scale`` every map uses one colour scale (one colour bar), else each map is
    stretched to its own range.
    """
    n = len(ids) + 1
    cols = min(8, math.ceil(math.sqrt(n * 1.5)))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.5 * cols + (0.8 if shared_scale else 0.2), 1.6 * rows + 0.7),
                 dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    picture = image.mean(axis=0) if image.ndim == 3 and image.shape[0] != 3 else (
        np.moveaxis(image, 0, -1) if image.ndim == 3 else image)
    if picture.ndim == 3:  # rgb: stretch to [0, 1] for display
        low, high = float(picture.min()), float(picture.max())
        picture = (picture - low) / (high - low) if high > low else picture * 0
    axes[0].imshow(picture, cmap="gray", interpolation="nearest")
    axes[0].set_title("input", fontsize=8, fontweight="bold")
    chosen = maps[ids]
    vmin = vmax = None
    if shared_scale:
        vmin, vmax = float(np.nanmin(chosen)), float(np.nanmax(chosen))
    artist = None
    for ax, i in zip(axes[1:], ids):
        artist = ax.imshow(maps[i], cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        if dead[i]:
            ax.set_title(f"#{i} dead", fontsize=8, color="#c00000")
            for spine in ax.spines.values():
                spine.set_edgecolor("#c00000")
                spine.set_linewidth(2.5)
        else:
            ax.set_title(f"#{i}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.axis("off")
    if shared_scale and artist is not None:
        fig.colorbar(artist, ax=list(axes), shrink=0.6, label="activation")
    scale = "one colour scale" if shared_scale else "each map on its own colour scale"
    fig.suptitle(f"{title}\n({scale}; red: dead map, constant over the image)", fontsize=9)
    return fig
