"""Kernel grids: the filters of a convolution, per output map or per input channel."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from torch import nn

from mapsim.errors import MapsimError

MAX_ROWS = 32
MAX_COLS = 16


def find_conv(module: nn.Module, layer: str) -> tuple[str, nn.Conv2d]:
    """``module`` itself when it is a Conv2d, else its first Conv2d (e.g. inside conv/bn/relu)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            return (f"{layer}.{name}" if name else layer), sub
    raise MapsimError(f"layer {layer!r} holds no Conv2d, so it has no kernels to draw; "
                      "choose a convolutional layer (see `mapsim layers`)")


def kernels_figure(weight: np.ndarray, by: str, title: str) -> Figure:
    """A grid of 2-D kernels: rows are output maps (``by='output'``) or input channels.

    One symmetric colour scale (blue negative, red positive) for every kernel.
    """
    if by not in ("output", "input"):
        raise MapsimError(f"kernels are grouped by 'output' or 'input', not {by!r}")
    grid = weight if by == "output" else np.swapaxes(weight, 0, 1)
    n_rows, n_cols = min(grid.shape[0], MAX_ROWS), min(grid.shape[1], MAX_COLS)
    limit = float(np.abs(weight).max()) or 1.0
    fig = Figure(figsize=(0.55 * n_cols + 1.8, 0.55 * n_rows + 1.2), dpi=100,
                 layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    artist = None
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            artist = ax.imshow(grid[r, c], cmap="RdBu_r", vmin=-limit, vmax=limit,
                               interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{'out' if by == 'output' else 'in'} {r}", fontsize=6,
                              rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(f"{'in' if by == 'output' else 'out'} {c}", fontsize=6)
    fig.colorbar(artist, ax=axes.ravel().tolist(), shrink=0.6, label="weight")
    cut = ""
    if grid.shape[0] > n_rows or grid.shape[1] > n_cols:
        cut = f"; first {n_rows} x {n_cols} of {grid.shape[0]} x {grid.shape[1]} shown"
    fig.suptitle(f"{title}\nrows: {by} {'maps' if by == 'output' else 'channels'}{cut}",
                 fontsize=8)
    return fig
