"""The prune results' figure (``prune.png``) and page (``prune.html``).

``prune.png`` has, for each layer set (all the pruned layers together, or with ``per_layer``
each layer), two panels, IoU right after pruning and after fine-tuning: mean IoU over seeds
(error bars: one standard deviation) against the parameters left, one line per criterion (the
same colour in every panel), and a dashed line at the unpruned model's IoU. ``prune.html`` is a
standalone page: the figure (inlined) and the answer and summary tables.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from mapsim.io.atomic import atomic_path


def write_figure(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Draw ``prune.png`` from ``prune_summary.csv``'s table: a row of two panels (right
    after pruning, after fine-tuning) per layer set, one line per criterion."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    none = summary[summary.criterion == "none"]
    pruned = summary[(summary.criterion != "none") & summary.sparsity.notna()]
    sets = list(dict.fromkeys(pruned.layers)) or [""]
    criteria = list(dict.fromkeys(pruned.criterion))
    colours = {c: f"C{k % 10}" for k, c in enumerate(criteria)}
    fig = Figure(figsize=(11, 1.0 + 2.6 * len(sets)), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(sets), 2, sharey=True, squeeze=False))
    for row, layers in enumerate(sets):
        for col, stage in enumerate(("pruned", "finetuned")):
            ax = axes[row, col]
            for criterion in criteria:
                group = pruned[(pruned.layers == layers) & (pruned.criterion == criterion)]
                group = group.sort_values("parameters")
                if group.empty or group[f"iou_{stage}"].isna().all():
                    continue
                std = group[f"iou_{stage}_std"].fillna(0.0).to_numpy(dtype=float)
                ax.errorbar(group.parameters, group[f"iou_{stage}"], yerr=std, marker="o",
                            markersize=3, capsize=2, linewidth=1, color=colours[criterion],
                            label=criterion)
            if len(none):
                ax.axhline(float(none.iou_pruned.iloc[0]), color="0.3", linestyle="--",
                           linewidth=1, label="unpruned")
            stage_name = "right after pruning" if stage == "pruned" else "after fine-tuning"
            ax.set_title(f"{layers}: {stage_name}" if layers else stage_name, fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        axes[row, 0].set_ylabel("IoU", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("parameters (mean over seeds; error bars: ± 1 sd)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(7, len(labels) or 1),
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(title, y=0.995 - 0.35 / (1.0 + 2.6 * len(sets)), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / (1.0 + 2.6 * len(sets))))
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}",
                         border=0, classes="t")


def write_html(summary: pd.DataFrame, answers: pd.DataFrame, path: Path, title: str,
               tolerance: float) -> None:
    """Write ``prune.html`` beside ``prune.png`` (which must exist)."""
    png = base64.b64encode((Path(path).parent / "prune.png").read_bytes()).decode("ascii")
    shown = summary.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f" and column.startswith(("parameters", "macs")):
            shown[column] = shown[column].round(0)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}: pruning</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:90em}}
table.t{{border-collapse:collapse;font-size:12px}}
table.t td,table.t th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}}</style>
</head><body><h1>{html.escape(title)}: pruning</h1>
<p>IoU on the evaluation images against parameters, one line per criterion; mean over seeds,
error bars one standard deviation; dashed: the unpruned model.</p>
<img alt="IoU against parameters" style="max-width:100%" src="data:image/png;base64,{png}">
<h2>How much each criterion removes within an IoU drop of {tolerance:g}</h2>
{_table(answers) if len(answers) else "<p>No sparsity levels were run.</p>"}
<h2>Every level, averaged over seeds</h2>
{_table(shown.replace({np.nan: None}))}
</body></html>
"""
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")


__all__ = ["write_figure", "write_html"]
