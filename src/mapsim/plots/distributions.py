"""Distributions: histograms of best-partner values per layer pair, and full map x map matrices."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mapsim.io.results import MetricView, ResultsDir
from mapsim.plots.capture import KEY_SEP


def best_values(rows: pd.DataFrame | None) -> np.ndarray:
    """The defined best-partner values of one layer pair's rows of max.csv (all images)."""
    if rows is None:
        return np.array([])
    values = pd.to_numeric(rows["value"], errors="coerce").to_numpy(dtype=float)
    return values[~np.isnan(values)]


def histogram_figure(results: ResultsDir, view: MetricView, model_a: str, model_b: str,
                     threshold: float | None) -> Figure | None:
    """A grid of histograms, rows: layers of model_a, columns: layers of model_b."""
    pairs = results.by_pair("max")
    rows, cols = results.layers(model_a), results.layers(model_b)
    data = {(la, lb): best_values(pairs.get((view.label, model_a, la, model_b, lb)))
            for la in rows for lb in cols}
    if not any(v.size for v in data.values()):
        return None
    bounded = view.bounded_range()
    if bounded is None:
        everything = np.concatenate([v for v in data.values() if v.size])
        bounded = (float(everything.min()), float(everything.max()) or 1.0)
    bins = np.linspace(bounded[0], bounded[1] if bounded[1] > bounded[0] else bounded[0] + 1, 21)
    width, height = 1.6 * len(cols) + 1.3, 1.25 * len(rows) + 1.2
    fig = Figure(figsize=(width, height), dpi=100)
    axes = fig.subplots(len(rows), len(cols), sharex=True, squeeze=False)
    # margins in inches (a fixed layout: much faster than the constrained one for many axes)
    fig.subplots_adjust(left=1.1 / width, right=1 - 0.15 / width, bottom=0.55 / height,
                        top=1 - 0.65 / height, wspace=0.35, hspace=0.3)
    for i, la in enumerate(rows):
        for j, lb in enumerate(cols):
            ax = axes[i][j]
            values = data[(la, lb)]
            # one filled step artist per panel (ax.hist draws a patch per bin: much slower)
            ax.stairs(np.histogram(values, bins=bins)[0], bins, fill=True, color="#4c72b0")
            if threshold is not None:
                ax.axvline(threshold, color="#c44e52", linewidth=1)
            ax.tick_params(labelsize=6)
            if values.size == 0:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
            if i == 0:
                ax.set_title(f"{model_b}: {lb}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{model_a}: {la}\nmaps", fontsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel(f"best {view.label}", fontsize=7)
    thr = f"; red line: threshold {threshold:g}" if threshold is not None else ""
    title = (f"{view.label}: best-partner value ({view.best_word}) of each map of {model_a} "
             f"(rows) in each layer of {model_b} (columns), all images{thr}")
    fig.suptitle(textwrap.fill(title, width=max(30, int(width * 15))), fontsize=8)
    return fig


def matrix_figure(matrices: dict, key: str, image: str, view: MetricView) -> Figure | None:
    """The full map x map matrix of one comparison with layer boundaries."""
    if key not in matrices:
        return None
    values = matrices[key]
    meta = matrices.get("__meta__", {}).get(key, {})
    _, model_a, model_b = key.split(KEY_SEP)
    blocks_a, blocks_b = meta.get("blocks_a", []), meta.get("blocks_b", [])
    size = min(10.0, 3.0 + values.shape[1] / 25)
    fig = Figure(figsize=(size + 1.5, size * values.shape[0] / max(values.shape[1], 1) + 1.5),
                 dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_facecolor("#d9d9d9")
    bounded = view.bounded_range()
    kwargs = {"vmin": bounded[0], "vmax": bounded[1]} if bounded else {}
    image_artist = ax.imshow(np.ma.masked_invalid(values), interpolation="nearest",
                             cmap="viridis" if view.higher_is_more_similar else "viridis_r",
                             aspect="auto", **kwargs)
    fig.colorbar(image_artist, ax=ax, label=view.label, shrink=0.8)
    for blocks, axis in ((blocks_a, "y"), (blocks_b, "x")):
        edges = np.cumsum([n for _, n in blocks])
        centres = edges - np.array([n for _, n in blocks]) / 2 - 0.5
        for edge in edges[:-1]:
            (ax.axhline if axis == "y" else ax.axvline)(edge - 0.5, color="white", linewidth=1)
        if axis == "y":
            ax.set_yticks(centres, [name for name, _ in blocks], fontsize=7)
        else:
            ax.set_xticks(centres, [name for name, _ in blocks], fontsize=7, rotation=45,
                          ha="right")
    ax.set_ylabel(f"{model_a} maps (by layer)", fontsize=8)
    ax.set_xlabel(f"{model_b} maps (by layer)", fontsize=8)
    ax.set_title(f"{view.label} between every map pair, image {image} (grey: undefined)",
                 fontsize=9)
    return fig
