"""Layer x layer heat maps: mean best value and % well correlated (study Fig. 17-20), CKA-like.

The data layer (:func:`summary_grid`, :func:`pivot_grid`, :func:`layer_metric_grids`) turns
the tables into layer x layer frames; :func:`heatmap_sets` collects them into
:class:`HeatmapSet` objects that both the PNGs (:func:`draw_set`) and the HTML report use, so
a picture and the report always show the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import seaborn  # noqa: F401 - registers the colour maps ("rocket") used by the heat maps
from matplotlib.figure import Figure

from mapsim.io.results import POOLED_IMAGE, MetricView, ResultsDir
from mapsim.plots import chance as chance_levels

#: the per-layer-pair statistics drawn as heat maps: (pivot column, short name)
STATISTICS = ("best_mean", "pct_well")
ANNOTATE_MAX = 12  # above this many rows or columns, std goes to its own row of panels


@dataclass
class Panel:
    """One comparison direction: rows are layers of model_a, columns layers of model_b."""

    model_a: str
    model_b: str
    mean: pd.DataFrame
    std: pd.DataFrame | None = None
    #: the confidence interval over images of ``mean`` (summary.csv's ci_low, ci_high)
    low: pd.DataFrame | None = None
    high: pd.DataFrame | None = None
    #: 1.0 above chance, 0.0 not above, NaN unknown (baselines.csv, spatial null)
    above: pd.DataFrame | None = None
    #: the spatial null's 95th percentile (the chance level the cell is compared with)
    chance: pd.DataFrame | None = None

    @property
    def title(self) -> str:
        if self.model_a == self.model_b:
            return f"{self.model_a} × {self.model_a} (intra)"
        return f"{self.model_a} → {self.model_b} (inter)"


@dataclass
class HeatmapSet:
    """Panels meant to be compared: one figure, one colour scale."""

    key: str  # file stem, e.g. heatmap-pearson-best_mean
    metric: str
    statistic: str  # best_mean, pct_well or value (layer-level metric)
    image: str | None  # None: mean +- std over images
    title: str
    cbar_label: str
    vmin: float
    vmax: float
    cmap: str
    fmt: str
    panels: list[Panel] = field(default_factory=list)


def _grid(frame: pd.DataFrame, rows: list[str], cols: list[str], column: str) -> pd.DataFrame:
    grid = frame.pivot_table(index="layer_a", columns="layer_b", values=column,
                             aggfunc="first", dropna=False)
    grid = grid.reindex(index=rows, columns=cols)
    grid.index.name, grid.columns.name = "layer_a", "layer_b"
    return grid.astype(float)


def _select(frame: pd.DataFrame, metric: str, model_a: str, model_b: str) -> pd.DataFrame:
    out = frame[(frame["metric"].astype(str) == metric)
                & (frame["model_a"].astype(str) == model_a)
                & (frame["model_b"].astype(str) == model_b)].copy()
    for col in ("layer_a", "layer_b"):
        out[col] = out[col].astype(str)
    return out


def summary_grid(summary: pd.DataFrame, metric: str, model_a: str, model_b: str,
                 statistic: str, rows: list[str], cols: list[str]
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean and std over images of one pivot statistic, layer_a x layer_b, from summary.csv."""
    sel = _select(summary, metric, model_a, model_b)
    sel = sel[sel["statistic"] == statistic]
    return _grid(sel, rows, cols, "mean"), _grid(sel, rows, cols, "std")


def pivot_grid(pivot: pd.DataFrame, image: str, metric: str, model_a: str, model_b: str,
               statistic: str, rows: list[str], cols: list[str]) -> pd.DataFrame:
    """One image's pivot statistic, layer_a x layer_b, from pivot.csv."""
    sel = _select(pivot, metric, model_a, model_b)
    sel = sel[sel["image"].astype(str) == image]
    return _grid(sel, rows, cols, statistic)


def layer_metric_grids(table: pd.DataFrame, metric: str, model_a: str, model_b: str,
                       rows: list[str], cols: list[str], symmetric: bool = True
                       ) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, pd.DataFrame]:
    """A layer-level metric from layer_similarity.csv: per-image grids, mean and std (ddof=1).

    A cell missing in one direction is read from the other when the metric is symmetric;
    undefined values (empty, with a ``reason``) stay NaN and are skipped by mean and std.
    """
    sel = _select(table, metric, model_a, model_b)
    if symmetric:
        back = _select(table, metric, model_b, model_a).rename(
            columns={"layer_a": "layer_b", "layer_b": "layer_a"})
        sel = pd.concat([sel, back], ignore_index=True).drop_duplicates(
            subset=["image", "layer_a", "layer_b"], keep="first")
    sel["value"] = pd.to_numeric(sel["value"], errors="coerce")
    per_image = {}
    for image in dict.fromkeys(sel["image"].astype(str)):
        per_image[image] = _grid(sel[sel["image"].astype(str) == image], rows, cols, "value")
    stack = [g.to_numpy() for i, g in per_image.items() if i != POOLED_IMAGE]
    if stack:
        cube = np.stack(stack)
        mean, std = _nanmean(cube), _nanstd(cube)
    else:
        mean = std = np.full((len(rows), len(cols)), np.nan)
    like = pd.DataFrame(mean, index=rows, columns=cols)
    return per_image, like, pd.DataFrame(std, index=rows, columns=cols)


def _nanmean(cube: np.ndarray) -> np.ndarray:
    count = np.sum(~np.isnan(cube), axis=0)
    total = np.nansum(cube, axis=0)
    with np.errstate(all="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _nanstd(cube: np.ndarray) -> np.ndarray:
    count = np.sum(~np.isnan(cube), axis=0)
    mean = _nanmean(cube)
    dev = np.nansum((cube - mean) ** 2, axis=0)
    with np.errstate(all="ignore"):
        return np.where(count > 1, np.sqrt(dev / np.maximum(count - 1, 1)), np.nan)


# ---------------------------------------------------------------------- sets of panels
def _threshold(results: ResultsDir, metric: str) -> float | None:
    for frame in (results.summary, results.pivot, results.max):
        if "threshold" not in frame:
            continue
        values = frame.loc[frame["metric"].astype(str) == metric, "threshold"].dropna().unique()
        if len(values):
            return float(values[0])
    return None


def _labels(view: MetricView, statistic: str, threshold: float | None) -> tuple[str, str]:
    """(title, colour-bar label) of a statistic."""
    kind = "similarity" if view.higher_is_more_similar else "distance: lower is more similar"
    if statistic == "best_mean":
        return (f"{view.label} ({kind}): mean over maps of the best partner's value "
                f"({view.best_word}), threshold {threshold:g}" if threshold is not None else
                f"{view.label} ({kind}): mean over maps of the best partner's value "
                f"({view.best_word})",
                f"mean of {view.best_word} {view.label}")
    if statistic == "pct_well":
        rule = view.passes_word(threshold) if threshold is not None else "passing"
        return (f"{view.label} ({kind}): % of maps well correlated (best value {rule})",
                f"% maps with {view.best_word} {view.label} {rule}")
    return (f"{view.label} ({kind}): layer-level value", view.label)


def _range(view: MetricView, statistic: str, grids: list[pd.DataFrame]) -> tuple[float, float]:
    if statistic == "pct_well":
        return 0.0, 100.0
    bounded = view.bounded_range()
    if bounded is not None:
        return bounded
    values = np.concatenate([g.to_numpy().ravel() for g in grids]) if grids else np.array([])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _cmap(view: MetricView, statistic: str) -> str:
    if statistic == "pct_well":
        return "rocket"
    return "viridis" if view.higher_is_more_similar else "viridis_r"


def heatmap_sets(results: ResultsDir) -> list[HeatmapSet]:
    """Every heat-map set of a run: per metric and statistic, the mean set then one per image."""
    sets: list[HeatmapSet] = []
    comparisons = results.comparisons()
    images = results.images()
    pooled = results.table("pooled/pivot")
    views = results.metrics()
    if results.has("layer_similarity"):  # a metric run.json does not describe: defaults
        for label in dict.fromkeys(results.layer_similarity["metric"].astype(str)):
            views.setdefault(label, results.metric(label))
    for label, view in views.items():
        threshold = _threshold(results, label)
        if view.granularity == "map" and results.has("summary"):
            for statistic in STATISTICS:
                sets.extend(_map_sets(results, view, statistic, threshold, comparisons,
                                      images, pooled))
        ls = results.layer_similarity
        if results.has("layer_similarity") and (ls["metric"].astype(str) == label).any():
            sets.extend(_layer_sets(results, view, comparisons))
    return sets


def _map_sets(results: ResultsDir, view: MetricView, statistic: str, threshold: float | None,
              comparisons: list[tuple[str, str]], images: list[str],
              pooled: pd.DataFrame | None, n_images: int | None = None) -> list[HeatmapSet]:
    """The sets of one map-level metric and statistic: the mean over images, one per image of
    ``images`` and the pooled one (with ``pooled``); ``n_images``: the number of images the
    mean is over, for its title (default: ``len(images)``)."""
    title, cbar = _labels(view, statistic, threshold)
    fmt = ".1f" if statistic == "pct_well" else ".2f"
    n = len(images) if n_images is None else n_images
    mean_panels, image_panels = [], {i: [] for i in images}
    pooled_panels = []
    null = chance_levels.baselines(results)
    for a, b in comparisons:
        rows, cols = results.layers(a), results.layers(b)
        mean, std = summary_grid(results.summary, view.label, a, b, statistic, rows, cols)
        if mean.isna().all().all():
            continue
        panel = Panel(a, b, mean, std)
        ci = chance_levels.interval_grids(results.summary, view.label, a, b, statistic, rows,
                                          cols)
        if ci is not None:
            panel.low, panel.high = ci
        marks = chance_levels.chance_grids(null, view.label, a, b, statistic, rows, cols)
        if marks is not None:
            panel.above, panel.chance = marks
        mean_panels.append(panel)
        for image in images:
            image_panels[image].append(Panel(a, b, pivot_grid(
                results.pivot, image, view.label, a, b, statistic, rows, cols)))
        if pooled is not None:
            grid = pivot_grid(pooled, POOLED_IMAGE, view.label, a, b, statistic, rows, cols)
            if not grid.isna().all().all():
                pooled_panels.append(Panel(a, b, grid))
    if not mean_panels:
        return []
    grids = [p.mean for p in mean_panels] + [p.mean for ps in image_panels.values() for p in ps]
    vmin, vmax = _range(view, statistic, grids + [p.mean for p in pooled_panels])
    cmap = _cmap(view, statistic)
    stem = f"heatmap-{view.label}-{statistic}"
    out = [HeatmapSet(stem, view.label, statistic, None, f"{title}\n{_mean_line(results, n, mean_panels)}",
                      cbar, vmin, vmax, cmap, fmt, mean_panels)]
    for image, panels in image_panels.items():
        out.append(HeatmapSet(f"{stem}-image-{image}", view.label, statistic, image,
                              f"{title}\nimage {image}", cbar, vmin, vmax, cmap, fmt, panels))
    if pooled_panels:
        out.append(HeatmapSet(f"{stem}-pooled", view.label, statistic, POOLED_IMAGE,
                              f"{title}\npooled: moments merged over {n} image(s)", cbar,
                              vmin, vmax, cmap, fmt, pooled_panels))
    return out


def _layer_sets(results: ResultsDir, view: MetricView,
                comparisons: list[tuple[str, str]]) -> list[HeatmapSet]:
    title, cbar = _labels(view, "value", None)
    mean_panels: list[Panel] = []
    per_image: dict[str, list[Panel]] = {}
    seen: set[tuple[str, str]] = set()
    for a, b in comparisons:
        if view.symmetric and (b, a) in seen:
            continue  # a symmetric metric: one direction is enough
        rows, cols = results.layers(a), results.layers(b)
        images, mean, std = layer_metric_grids(results.layer_similarity, view.label, a, b,
                                               rows, cols, view.symmetric)
        if not images:
            continue
        seen.add((a, b))
        panel = Panel(a, b, mean, std)
        ci = _layer_intervals(results, view, a, b, rows, cols)
        if ci is not None:
            panel.low, panel.high = ci
        panel.above = _layer_marks(results, view, a, b, rows, cols)
        mean_panels.append(panel)
        for image, grid in images.items():
            per_image.setdefault(image, []).append(Panel(a, b, grid))
    if not mean_panels:
        return []
    grids = [p.mean for p in mean_panels] + [p.mean for ps in per_image.values() for p in ps]
    vmin, vmax = _range(view, "value", grids)
    cmap = _cmap(view, "value")
    n = sum(1 for i in per_image if i != POOLED_IMAGE)
    stem = f"heatmap-{view.label}-value"
    line = _mean_line(results, n, mean_panels, f"permutation p >= {chance_levels.ALPHA:g}")
    out = [HeatmapSet(stem, view.label, "value", None, f"{title}\n{line}",
                      cbar, vmin, vmax, cmap, ".2f", mean_panels)]
    for image, panels in per_image.items():
        suffix = "pooled" if image == POOLED_IMAGE else f"image-{image}"
        which = "pooled over images" if image == POOLED_IMAGE else f"image {image}"
        out.append(HeatmapSet(f"{stem}-{suffix}", view.label, "value", image,
                              f"{title}\n{which}",
                              cbar, vmin, vmax, cmap, ".2f", panels))
    return out


def _layer_intervals(results: ResultsDir, view: MetricView, a: str, b: str, rows: list[str],
                     cols: list[str]) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The intervals of a layer-level metric (layer_similarity_summary.csv), either direction
    for a symmetric one."""
    table = results.table("layer_similarity_summary")
    ci = chance_levels.interval_grids(table, view.label, a, b, "value", rows, cols)
    if ci is not None and view.symmetric:
        back = chance_levels.interval_grids(table, view.label, b, a, "value", cols, rows)
        if back is not None:
            ci = tuple(one.fillna(other.T) for one, other in zip(ci, back))
    return ci


def _layer_marks(results: ResultsDir, view: MetricView, a: str, b: str, rows: list[str],
                 cols: list[str]) -> pd.DataFrame | None:
    """A layer-level metric's chance marks from its permutation p-values (either direction
    for a symmetric one); None when it has none."""
    table = results.layer_similarity
    above = chance_levels.permutation_grid(table, view.label, a, b, rows, cols)
    if view.symmetric:
        back = chance_levels.permutation_grid(table, view.label, b, a, cols, rows)
        if back is not None:
            above = back.T if above is None else above.fillna(back.T)
    return above


def _mean_line(results: ResultsDir, n: int, panels: list[Panel],
               rule: str = "not above the spatial null's p95") -> str:
    """The second title line of a mean set: what the cells show (``rule``: when a cell is
    marked not above chance)."""
    has_ci = any(p.low is not None and np.isfinite(p.low.to_numpy()).any() for p in panels)
    has_chance = any(p.above is not None and np.isfinite(p.above.to_numpy()).any()
                     for p in panels)
    if not has_ci:
        line = f"mean ± std over {n} image(s)"
    else:
        level = (results.info.get("intervals") or {}).get("level")
        pct = f"{100 * float(level):g}% " if level else ""
        line = f"mean over {n} image(s), below it its {pct}confidence interval"
    if has_chance:
        line += f"; '{chance_levels.BELOW_CHANCE}', dashed: {rule}"
    return line


# ---------------------------------------------------------------------- drawing
#: the side of one heat-map cell, in inches (80 px at the figures' 100 dpi): room for the
#: value at :data:`VALUE_PT` over its interval "0.78–0.84" and "≤ chance" at :data:`FONT_PT`
CELL_IN = 0.8
#: the side of a cell when a panel has more than :data:`ANNOTATE_MAX` rows or columns
SMALL_CELL_IN = 0.3
#: the size of every text in a heat-map figure (intervals, layer names, titles), points
FONT_PT = 9
#: the size of a cell's value (its first line)
VALUE_PT = 11
DPI = 100
_CHAR_IN = 0.6 * FONT_PT / 72  # a generous average character width
_LINE_IN = 1.3 * FONT_PT / 72


def _finite(frame: pd.DataFrame | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.full(shape, np.nan) if frame is None else frame.to_numpy(dtype=float)


def annotations(panel: Panel, fmt: str) -> np.ndarray:
    """Cell texts, one line each: the value; below it its confidence interval
    (``low–high``) where known, else ``±std`` where known; then ``≤ chance`` where the cell
    is not above chance. ``n/a`` where the value is undefined."""
    mean = panel.mean.to_numpy(dtype=float)
    std, low, high, above = (_finite(f, mean.shape)
                             for f in (panel.std, panel.low, panel.high, panel.above))
    text = np.empty(mean.shape, dtype=object)
    for idx in np.ndindex(mean.shape):
        m = mean[idx]
        if np.isnan(m):
            text[idx] = "n/a"
            continue
        lines = [format(m, fmt)]
        if np.isfinite(low[idx]) and np.isfinite(high[idx]):
            lines.append(chance_levels.interval_text(low[idx], high[idx], fmt))
        elif np.isfinite(std[idx]):
            lines.append(f"±{format(std[idx], fmt)}")
        if above[idx] == 0.0:
            lines.append(chance_levels.BELOW_CHANCE)
        text[idx] = "\n".join(lines)
    return text


def _text_in(texts: list[str]) -> float:
    return max((len(t) for t in texts), default=1) * _CHAR_IN


@dataclass
class _Grid:
    """Where each panel goes: a grid of blocks, rows by model_a and columns by model_b, so
    every panel of a row has that model's layers as rows and every cell is the same square."""

    row_models: list[str]
    col_models: list[str]
    cell: float
    ytick: float  # width of the row labels left of a panel, inches
    xtick: float  # height of the (rotated) column labels below a panel, inches
    col_w: list[float] = field(default_factory=list)  # each block column's width
    row_h: list[float] = field(default_factory=list)  # each block row's height

    @classmethod
    def of(cls, panels: list[Panel], cell: float) -> _Grid:
        rows = list(dict.fromkeys(p.model_a for p in panels))
        cols = list(dict.fromkeys(p.model_b for p in panels))
        labels_a = [str(x) for p in panels for x in p.mean.index]
        labels_b = [str(x) for p in panels for x in p.mean.columns]
        grid = cls(rows, cols, cell, _text_in(labels_a) + 0.1,
                   0.75 * _text_in(labels_b) + 0.15)  # labels at 45 degrees
        for m in cols:
            here = [p for p in panels if p.model_b == m]
            width = max(p.mean.shape[1] for p in here) * cell
            titles = max(1.1 * _text_in([p.title, f"{p.title}: std"])  # bold
                         for p in here)
            titles = max(titles, _text_in([f"{m} layer (partner)"]))
            grid.col_w.append(grid.ytick + 2 * _LINE_IN + max(width, titles) + 0.25)
        for m in rows:
            height = max(p.mean.shape[0] for p in panels if p.model_a == m) * cell
            grid.row_h.append(_LINE_IN + 0.1 + height + grid.xtick + _LINE_IN + 0.1)
        return grid

    def rect(self, panel: Panel, top: float) -> tuple[float, float, float, float]:
        """(left, bottom, width, height) of a panel in inches from the figure's bottom-left,
        for a grid whose top edge is ``top`` inches up."""
        i, j = self.row_models.index(panel.model_a), self.col_models.index(panel.model_b)
        n_rows, n_cols = panel.mean.shape
        width, height = n_cols * self.cell, n_rows * self.cell
        slot = self.col_w[j] - self.ytick - 2 * _LINE_IN - 0.25
        left = sum(self.col_w[:j]) + self.ytick + 2 * _LINE_IN + (slot - width) / 2
        bottom = top - sum(self.row_h[:i]) - _LINE_IN - 0.1 - height
        return left, bottom, width, height


def _draw_panel(fig: Figure, rect: tuple[float, float, float, float], size: tuple[float, float],
                data: pd.DataFrame, texts: np.ndarray | None, cmap: Any, vmin: float,
                vmax: float, title: str, panel: Panel) -> Any:
    w, h = size
    left, bottom, width, height = rect
    ax = fig.add_axes((left / w, bottom / h, width / w, height / h))
    values = data.to_numpy(dtype=float)
    mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax,
                         edgecolors="white", linewidth=0.5)
    ax.set_xlim(0, values.shape[1])
    ax.set_ylim(values.shape[0], 0)
    ax.set_yticks(np.arange(values.shape[0]) + 0.5, [str(x) for x in data.index],
                  fontsize=FONT_PT)
    ax.set_xticks(np.arange(values.shape[1]) + 0.5, [str(x) for x in data.columns],
                  fontsize=FONT_PT, rotation=45, ha="right", rotation_mode="anchor")
    ax.tick_params(length=2, pad=2)
    ax.set_title(title, fontsize=FONT_PT, fontweight="bold", pad=4)
    label = f"{panel.model_a} layer (maps)"
    if _text_in([label]) > height:  # a short panel: a shorter label that fits beside it
        label = f"{panel.model_a}\nmaps"
    ax.set_ylabel(label, fontsize=FONT_PT, labelpad=2, linespacing=1.0)
    ax.set_xlabel(f"{panel.model_b} layer (partner)", fontsize=FONT_PT, labelpad=2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if texts is not None:
        _annotate(ax, values, texts, cmap, vmin, vmax)
    return mesh


def _annotate(ax: Any, values: np.ndarray, texts: np.ndarray, cmap: Any, vmin: float,
              vmax: float) -> None:
    """Each cell's value (:data:`VALUE_PT`) just above its centre, the other lines
    (:data:`FONT_PT`) just below; a cell marked not above chance gets a dashed frame."""
    from matplotlib.patches import Rectangle

    span = (vmax - vmin) or 1.0
    for (r, c), text in np.ndenumerate(texts):
        value = values[r, c]
        dark = True
        if np.isfinite(value):
            red, green, blue, _ = cmap(min(max((value - vmin) / span, 0.0), 1.0))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue >= 0.55
        colour = "black" if dark else "white"
        head, _, rest = str(text).partition("\n")
        if not rest:
            ax.text(c + 0.5, r + 0.5, head, ha="center", va="center", fontsize=VALUE_PT,
                    color=colour)
            continue
        ax.text(c + 0.5, r + 0.5, head, ha="center", va="bottom", fontsize=VALUE_PT,
                color=colour)
        ax.text(c + 0.5, r + 0.53, rest, ha="center", va="top", fontsize=FONT_PT,
                linespacing=1.0, color=colour)
        if chance_levels.BELOW_CHANCE in rest:
            ax.add_patch(Rectangle((c + 0.03, r + 0.03), 0.94, 0.94, fill=False, linewidth=1,
                                   linestyle=(0, (3, 2)), edgecolor=colour))


def draw_set(hs: HeatmapSet) -> Figure:
    """The figure of one heat-map set: one panel per comparison direction, placed in a grid
    (rows: the model whose maps are compared, columns: the partner model), every cell the same
    square, one colour scale. With more than :data:`ANNOTATE_MAX` layers a side the cells are
    smaller and unlabelled, and the std over images gets its own grid of panels below."""
    import matplotlib

    big = any(max(p.mean.shape) > ANNOTATE_MAX for p in hs.panels)
    with_std = big and any(p.std is not None for p in hs.panels)
    grid = _Grid.of(hs.panels, SMALL_CELL_IN if big else CELL_IN)
    title_lines = hs.title.count("\n") + 1
    head = title_lines * _LINE_IN + 0.25
    bar = 0.2 + 0.15 + 2 * _LINE_IN + 0.3  # colour bar, its ticks and label
    block_h = sum(grid.row_h)
    width = max(sum(grid.col_w) + bar + 0.2, _text_in(hs.title.split("\n")) * 0.9 + 0.4)
    height = head + block_h * (2 if with_std else 1) + 0.1
    width, height = np.ceil(width * DPI) / DPI, np.ceil(height * DPI) / DPI  # whole pixels
    fig = Figure(figsize=(width, height), dpi=DPI)
    size = (width, height)
    main_cmap = matplotlib.colormaps[hs.cmap].with_extremes(bad="#d9d9d9")
    grey = matplotlib.colormaps["Greys"].with_extremes(bad="#d9d9d9")
    rows = [("mean", main_cmap, hs.vmin, hs.vmax, hs.cbar_label)]
    if with_std:
        top_std = max((float(np.nanmax(p.std.to_numpy())) for p in hs.panels
                       if p.std is not None and np.isfinite(p.std.to_numpy()).any()),
                      default=1.0)
        rows.append(("std", grey, 0.0, top_std or 1.0, f"std of {hs.cbar_label}"))
    caxes = []
    for k, (_, _, _, _, _) in enumerate(rows):  # colour bars first: fig.axes[0] is the main one
        top = height - head - k * block_h
        cax_bottom = top - block_h + grid.xtick + _LINE_IN + 0.1
        caxes.append(fig.add_axes(((sum(grid.col_w) + 0.1) / width, cax_bottom / height,
                                   0.2 / width, (top - 0.1 - cax_bottom) / height)))
    for k, (what, cmap, vmin, vmax, label) in enumerate(rows):
        top = height - head - k * block_h
        mesh = None
        for panel in hs.panels:
            data = panel.mean if what == "mean" else panel.std
            if data is None:
                continue
            texts = None if big else annotations(panel, hs.fmt)
            title = panel.title if what == "mean" else f"{panel.title}: std"
            mesh = _draw_panel(fig, grid.rect(panel, top), size, data, texts, cmap, vmin, vmax,
                               title, panel)
        if mesh is not None:
            bar_ = fig.colorbar(mesh, cax=caxes[k])
            bar_.set_label(label, fontsize=FONT_PT)
            bar_.ax.tick_params(labelsize=FONT_PT)
    fig.suptitle(hs.title, fontsize=FONT_PT + 1, y=1 - 0.1 / height, va="top")
    return fig
