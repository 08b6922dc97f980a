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
    low, high = bounded[0], bounded[1] if bounded[1] > bounded[0] else bounded[0] + 1
    bins = np.linspace(low, high, 21)
    width, height = 1.6 * len(cols) + 1.3, 1.25 * len(rows) + 1.2
    fig = Figure(figsize=(width, height), dpi=100)
    _histogram_grid(fig, (width, height), data, rows, cols, bins, threshold,
                    (f"{model_a}: {{}}\nmaps", f"{model_b}: {{}}"), f"best {view.label}")
    thr = f"; red line: threshold {threshold:g}" if threshold is not None else ""
    title = (f"{view.label}: best-partner value ({view.best_word}) of each map of {model_a} "
             f"(rows) in each layer of {model_b} (columns), all images{thr}; bar heights "
             "scaled to each panel's largest count (n: maps x images)")
    fig.suptitle(textwrap.fill(title, width=max(30, int(width * 15))), fontsize=8)
    return fig


def _histogram_grid(fig: Figure, size: tuple[float, float], data: dict, rows: list[str],
                    cols: list[str], bins: np.ndarray, threshold: float | None,
                    labels: tuple[str, str], xlabel: str) -> None:
    """Every layer pair's histogram in one axes: a panel per pair on a grid, the bars of all
    panels one polygon collection, frames and threshold lines one line collection each (a
    fraction of the cost of one matplotlib axes per panel, with its ticks)."""
    from matplotlib.collections import LineCollection, PolyCollection

    width, height = size
    ax = fig.add_axes((1.1 / width, 0.55 / height, 1 - 1.25 / width, 1 - 1.2 / height))
    ax.set_axis_off()
    gap_x, gap_y = 0.22, 0.3  # between panels, in panel widths / heights
    n_r, n_c = len(rows), len(cols)
    ax.set_xlim(-0.02, n_c + (n_c - 1) * gap_x + 0.02)  # room for the frames' lines
    ax.set_ylim(n_r + (n_r - 1) * gap_y + 0.02, -0.02)  # row 0 on top
    low, high = float(bins[0]), float(bins[-1])
    edges = (bins - low) / (high - low)
    bars, frames, marks = [], [], []
    for i, la in enumerate(rows):
        top = i * (1 + gap_y)
        for j, lb in enumerate(cols):
            left = j * (1 + gap_x)
            values = data[(la, lb)]
            frames.append([(left, top), (left + 1, top), (left + 1, top + 1), (left, top + 1),
                           (left, top)])
            if values.size == 0:
                ax.text(left + 0.5, top + 0.5, "no values", ha="center", va="center",
                        fontsize=7)
            else:
                counts = np.histogram(values, bins=bins)[0]
                scaled = counts / max(int(counts.max()), 1) * 0.82  # room for n=
                xs = left + np.repeat(edges, 2)[1:-1]
                ys = top + 1 - np.repeat(scaled, 2)
                bars.append(np.column_stack([np.r_[xs[0], xs, xs[-1]],
                                             np.r_[top + 1, ys, top + 1]]))
                ax.text(left + 0.02, top + 0.03, f"n={values.size}", ha="left", va="top",
                        fontsize=7, color="#555")
            if threshold is not None and low <= threshold <= high:
                x = left + (threshold - low) / (high - low)
                marks.append([(x, top), (x, top + 1)])
            if i == 0:
                ax.text(left + 0.5, top - 0.05, labels[1].format(lb), ha="center",
                        va="bottom", fontsize=7)
            if j == 0:
                ax.text(left - 0.04, top + 0.5, labels[0].format(la), ha="right",
                        va="center", fontsize=7)
            if i == n_r - 1:
                for x, text in ((0.0, format(low, "g")), (1.0, format(high, "g"))):
                    ax.text(left + x, top + 1.03, text, ha="center", va="top", fontsize=7)
                ax.text(left + 0.5, top + 1.03, xlabel, ha="center", va="top", fontsize=7)
    ax.add_collection(PolyCollection(bars, facecolors="#4c72b0", edgecolors="none"))
    ax.add_collection(LineCollection(frames, colors="#bbbbbb", linewidths=0.6))
    if marks:
        ax.add_collection(LineCollection(marks, colors="#c44e52", linewidths=1))


def matrix_figure(matrices: dict, key: str, image: str, view: MetricView) -> Figure | None:
    """The full map x map matrix of one comparison with layer boundaries."""
    if key not in matrices:
        return None
    values = matrices[key]
    meta = matrices.get("__meta__", {}).get(key, {})
    _, model_a, model_b = key.split(KEY_SEP)
    blocks_a, blocks_b = meta.get("blocks_a", []), meta.get("blocks_b", [])
    size = min(10.0, 3.0 + values.shape[1] / 25)
    width, height = size + 2.0, size * values.shape[0] / max(values.shape[1], 1) + 1.5
    fig = Figure(figsize=(width, height), dpi=100)
    # a fixed layout, margins in inches (no constrained-layout solver): room for the layer
    # names left and below (rotated), the title above and the colour bar right
    ax = fig.add_axes((0.95 / width, 0.85 / height, size / width, (height - 1.3) / height))
    ax.set_facecolor("#d9d9d9")
    bounded = view.bounded_range()
    kwargs = {"vmin": bounded[0], "vmax": bounded[1]} if bounded else {}
    image_artist = ax.imshow(np.ma.masked_invalid(values), interpolation="nearest",
                             cmap="viridis" if view.higher_is_more_similar else "viridis_r",
                             aspect="auto", **kwargs)
    cax = fig.add_axes(((0.95 + size + 0.12) / width, 0.85 / height, 0.15 / width,
                        (height - 1.3) / height))
    fig.colorbar(image_artist, cax=cax, label=view.label)
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
