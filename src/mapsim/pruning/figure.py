"""The prune results' figure (``prune.png``) and page (``prune.html``).

``prune.png`` has two panels, IoU right after pruning and after fine-tuning, each with mean IoU
(over seeds; error bars: one standard deviation) against the parameters left, one line per
criterion (and per layer set when layers are pruned one at a time, in the legend as
``criterion @ layer``), and a dashed line at the unpruned model's IoU. ``prune.html`` is a
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
    """Draw ``prune.png`` from ``prune_summary.csv``'s table."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    none = summary[summary.criterion == "none"]
    pruned = summary[(summary.criterion != "none") & summary.sparsity.notna()]
    several = pruned.layers.nunique() > 1
    for ax, stage in zip(axes, ("pruned", "finetuned")):
        for (criterion, layers), group in pruned.groupby(["criterion", "layers"], sort=False):
            group = group.sort_values("parameters")
            if group[f"iou_{stage}"].isna().all():
                continue
            label = f"{criterion} @ {layers}" if several else criterion
            std = group[f"iou_{stage}_std"].fillna(0.0).to_numpy(dtype=float)
            ax.errorbar(group.parameters, group[f"iou_{stage}"], yerr=std, marker="o",
                        markersize=3, capsize=2, linewidth=1, label=label)
        if len(none):
            ax.axhline(float(none.iou_pruned.iloc[0]), color="0.3", linestyle="--",
                       linewidth=1, label="unpruned")
        ax.set_xlabel("parameters")
        ax.set_title("right after pruning" if stage == "pruned" else "after fine-tuning")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("IoU (mean over seeds, ± 1 sd)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.subplots_adjust(right=0.78 if not several else 0.7, wspace=0.08)
    with atomic_path(Path(path)) as tmp:
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
