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


def groups_figure(groups: list[list[Member]], thumbs: dict[str, np.ndarray], view: MetricView,
                  threshold: float, image: str, title_pair: str) -> Figure | None:
    """Rows of thumbnails, one row per group."""
    groups = [g for g in groups if all(thumb_key(m.model, m.layer) in thumbs for m in g)]
    if not groups:
        return None
    shown = groups[:MAX_GROUPS]
    width = min(MAX_PER_GROUP, max(len(g) for g in shown))
    two_models = len({m.model for g in shown for m in g}) > 1
    # at least 5.5 inches wide, so the two-line title is never clipped
    fig = Figure(figsize=(max(5.5, 1.25 * width + 0.6), 1.55 * len(shown) + 0.9), dpi=100,
                 layout="constrained")
    axes = fig.subplots(len(shown), width, squeeze=False)
    for r, group in enumerate(shown):
        for c in range(width):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(group):
                ax.axis("off")
                continue
            m = group[c]
            maps = thumbs[thumb_key(m.model, m.layer)]
            ax.imshow(maps[m.map_id], cmap="gray", interpolation="nearest")
            name = f"{m.model} {m.layer}" if two_models else m.layer
            ax.set_title(f"{name} #{m.map_id}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"group {r + 1}", fontsize=7)
            if m.value is not None:
                ax.set_xlabel(f"→ #{m.partner}: {m.value:.2f}", fontsize=7)
        if len(group) > width:
            axes[r][-1].set_xlabel(f"+{len(group) - width} more", fontsize=7)
    hidden = len(groups) - len(shown)
    more = f" ({hidden} more groups not shown)" if hidden else ""
    fig.suptitle(f"{view.label}: maps whose best partner passes {view.passes_word(threshold)}, "
                 f"grouped with their partners\n{title_pair}, image {image}{more}", fontsize=8)
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
