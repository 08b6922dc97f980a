"""Well-correlated groups (study Fig. 13): maps that pass the threshold, with their partners.

For one image and one layer pair, every map whose best partner passes the threshold is linked
to that partner; the connected sets of linked maps are the groups. Each group is drawn as a row
of thumbnails (each on its own colour scale) with the map ids and best values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mapsim.io.results import MetricView
from mapsim.plots.capture import thumb_key

MAX_GROUPS = 12
MAX_PER_GROUP = 10


@dataclass(frozen=True)
class Member:
    """One map of a group: which side (a or b), its layer, id, best partner and value."""

    side: str
    model: str
    layer: str
    map_id: int
    partner: int | None
    value: float | None


def well_groups(best: pd.DataFrame, image: str, metric: str, model_a: str, layer_a: str,
                model_b: str, layer_b: str) -> list[list[Member]]:
    """Groups of maps linked by well-correlated best partners (largest group first).

    Within one model and one layer both ends of a link are maps of that layer; otherwise the
    links join maps of layer a to maps of layer b.
    """
    def rows(ma: str, la: str, mb: str, lb: str) -> pd.DataFrame:
        return best[(best["image"].astype(str) == image) & (best["metric"].astype(str) == metric)
                    & (best["model_a"].astype(str) == ma) & (best["layer_a"].astype(str) == la)
                    & (best["model_b"].astype(str) == mb) & (best["layer_b"].astype(str) == lb)]

    same = model_a == model_b and layer_a == layer_b
    sides = [("a", model_a, layer_a, model_b, layer_b)]
    if not same:
        sides.append(("b", model_b, layer_b, model_a, layer_a))
    other = {"a": "b", "b": "a"}
    parent: dict[tuple[str, int], tuple[str, int]] = {}
    members: dict[tuple[str, int], Member] = {}

    def find(node):
        while parent.setdefault(node, node) != node:
            node = parent[node]
        return node

    for side, ma, la, mb, lb in sides:
        sel = rows(ma, la, mb, lb)
        if "well_correlated" not in sel:
            continue
        for rec in sel.itertuples(index=False):
            if not bool(rec.well_correlated) or pd.isna(rec.map_b):
                continue
            node = (side, int(rec.map_a))
            target = ("a" if same else other[side], int(rec.map_b))
            members[node] = Member(node[0], ma, la, node[1], int(rec.map_b), float(rec.value))
            parent[find(node)] = find(target)
            if target not in members:
                members[target] = Member(target[0], mb, lb, target[1], None, None)
    groups: dict[tuple[str, int], list[Member]] = {}
    for node in sorted(members):
        groups.setdefault(find(node), []).append(members[node])
    # a member first seen as a partner may later have become a passing map itself
    return sorted(groups.values(), key=lambda g: (-len(g), g[0].side, g[0].map_id))


TILE_IN = 1.1  # a thumbnail's side in the figure, inches
TEXT_PT = 8


def _tile(maps: np.ndarray, box: tuple[int, int]) -> np.ndarray:
    """One map stretched to [0, 1] (its own colour scale), centred in a NaN box."""
    arr = np.asarray(maps, dtype=np.float32)
    finite = np.isfinite(arr)
    low, high = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0, 0)
    scaled = (np.where(finite, arr, low) - low) / (high - low) if high > low else arr * 0 + 0.5
    out = np.full(box, np.nan, dtype=np.float32)
    top, left = (box[0] - arr.shape[0]) // 2, (box[1] - arr.shape[1]) // 2
    out[top:top + arr.shape[0], left:left + arr.shape[1]] = scaled
    return out


def groups_figure(groups: list[list[Member]], thumbs: dict[str, np.ndarray], view: MetricView,
                  threshold: float, image: str, title_pair: str) -> Figure | None:
    """Rows of thumbnails, one row per group.

    The thumbnails are pasted into one mosaic drawn by a single image artist (one axes, not
    one per map: much faster to lay out and render), with the texts in its pixel coordinates.
    """
    groups = [g for g in groups if all(thumb_key(m.model, m.layer) in thumbs for m in g)]
    if not groups:
        return None
    shown = groups[:MAX_GROUPS]
    width = min(MAX_PER_GROUP, max(len(g) for g in shown))
    two_models = len({m.model for g in shown for m in g}) > 1
    layers = {thumb_key(m.model, m.layer) for g in shown for m in g}
    box = (max(thumbs[k].shape[-2] for k in layers), max(thumbs[k].shape[-1] for k in layers))
    px_per_in = max(box) / TILE_IN
    line = round(1.35 * TEXT_PT / 72 * px_per_in)  # one text line, in mosaic pixels
    gap = round(0.12 * px_per_in)
    slot_h, slot_w = box[0] + 2 * line + gap, box[1] + gap
    mosaic = np.full((slot_h * len(shown), slot_w * width), np.nan, dtype=np.float32)
    texts: list[tuple[float, float, str, str]] = []  # x, y, text, vertical alignment
    for r, group in enumerate(shown):
        top = r * slot_h + line
        for c, m in enumerate(group[:width]):
            left = c * slot_w
            maps = thumbs[thumb_key(m.model, m.layer)]
            mosaic[top:top + box[0], left:left + box[1]] = _tile(maps[m.map_id], box)
            name = f"{m.model} {m.layer}" if two_models else m.layer
            centre = left + box[1] / 2
            texts.append((centre, top - 2, f"{name} #{m.map_id}", "bottom"))
            if m.value is not None:
                texts.append((centre, top + box[0] + 2, f"→ #{m.partner}: {m.value:.2f}", "top"))
        if len(group) > width:
            texts.append(((width - 0.5) * slot_w, top + box[0] + line + 2,
                          f"+{len(group) - width} more", "top"))
    hidden = len(groups) - len(shown)
    more = f" ({hidden} more groups not shown)" if hidden else ""
    title = (f"{view.label}: maps whose best partner passes {view.passes_word(threshold)}, "
             f"grouped with their partners\n{title_pair}, image {image}{more}")
    left_in, head_in = 0.75, 2 * 1.4 * TEXT_PT / 72 + 0.2
    mosaic_w, mosaic_h = mosaic.shape[1] / px_per_in, mosaic.shape[0] / px_per_in
    fig_w = max(5.5, left_in + mosaic_w + 0.2)  # wide enough for the two-line title
    fig_h = head_in + mosaic_h + 0.1
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    ax = fig.add_axes((left_in / fig_w, 0.1 / fig_h, mosaic_w / fig_w, mosaic_h / fig_h))
    import matplotlib

    cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=0, vmax=1,
              interpolation="nearest", aspect="equal")
    ax.axis("off")
    for x, y, text, va in texts:
        ax.text(x, y, text, ha="center", va=va, fontsize=TEXT_PT)
    for r in range(len(shown)):
        ax.text(-gap, r * slot_h + line + box[0] / 2, f"group {r + 1}", ha="right",
                va="center", fontsize=TEXT_PT)
    fig.suptitle(title, fontsize=TEXT_PT + 1, y=1 - 0.08 / fig_h, va="top")
    return fig


def group_members(results_dir: str, group: int, model: str, layer_path: str,
                  image: str | None = None) -> tuple[list[int], str]:
    """Map ids of group number ``group`` (1-based, as numbered in the groups figure) of a
    layer with itself in a results directory; also returns a caption.

    ``layer_path`` is a module path; the run's label for it is looked up in run.json.
    """
    from mapsim.errors import MapsimError
    from mapsim.io.results import ResultsDir

    results = ResultsDir.open(results_dir)
    models = results.info.get("models", {})
    if model not in models:
        raise MapsimError(f"{results_dir} has no model {model!r} (its models: "
                          f"{', '.join(models) or 'none'}); name it with --model")
    layers = models[model].get("layers", {})
    labels = [label for label, path in layers.items() if path == layer_path]
    if not labels:
        raise MapsimError(f"model {model!r} layer {layer_path!r} was not compared in "
                          f"{results_dir} (its layers: {', '.join(layers.values()) or 'none'})")
    label = labels[0]
    metric = next((m.label for m in results.metrics().values() if m.granularity == "map"), None)
    rows = results.by_pair("max").get((metric, model, label, model, label))
    if rows is None:
        raise MapsimError(f"{results_dir} has no max.csv rows for {model} {label}")
    images = list(dict.fromkeys(rows["image"].astype(str)))
    image = image or images[0]
    if image not in images:
        raise MapsimError(f"image {image!r} is not in {results_dir}; its images: "
                          f"{', '.join(images)}")
    found = well_groups(rows, image, metric, model, label, model, label)
    if not 1 <= group <= len(found):
        raise MapsimError(f"{model} {label} has {len(found)} well-correlated group(s) in image "
                          f"{image}; choose a group from 1 to {len(found)}")
    ids = [m.map_id for m in found[group - 1]]
    return ids, f"group {group} of {metric} in {image}"
