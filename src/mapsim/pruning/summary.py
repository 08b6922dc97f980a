"""Averages over seeds and the experiment's answer (``prune_summary.csv``, ``prune_answer.csv``).

:func:`summarise` groups ``prune.csv`` by criterion, layer set and sparsity and gives, for
each number, the mean and the sample standard deviation over seeds (``_std``; empty for one
seed), the number of seeds, and the drop in mean IoU from the unpruned model
(``iou_drop_pruned``, ``iou_drop_finetuned``: unpruned mean IoU minus the row's).

:func:`answer` reads the summary: for each criterion and layer set, the largest sparsity whose
mean IoU drop is at most ``tolerance`` (the study's question: 0.01), right after pruning and
after fine-tuning, with the maps it removes and the parameters left. A level counts only if
every smaller level of the same criterion and layer set also stays within the tolerance, so
that one lucky level past a failing one does not count. For a criterion pruned at its threshold
(the rows without a sparsity, e.g. ``correlation`` at |r| >= 0.8) the same row also gives what
the threshold did: ``maps_removed_threshold``, ``parameters_threshold`` and the mean IoU drops
``iou_drop_threshold_pruned`` and ``iou_drop_threshold_finetuned`` (empty for a criterion
without threshold rows). A criterion and layer set with threshold rows only (``sparsity: []``)
gets a row too, its sparsity columns 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

KEYS = ["criterion", "layers", "sparsity"]
NUMBERS = ["maps_removed", "parameters", "macs", "iou_pruned", "cldice_pruned",
           "iou_finetuned", "cldice_finetuned"]


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of every row of ``prune.csv`` (see the module docs)."""
    frame = table.copy()
    frame["sparsity_key"] = frame["sparsity"].fillna(-1.0)
    frame["layers"] = frame["layers"].fillna("")
    grouped = frame.groupby(["criterion", "layers", "sparsity_key"], sort=False)
    means = grouped[NUMBERS].mean()
    stds = grouped[NUMBERS].std(ddof=1).add_suffix("_std")
    out = pd.concat([means, stds], axis=1)
    out["seeds"] = grouped["seed"].nunique()
    out = out.reset_index()
    out["sparsity"] = out.pop("sparsity_key").replace(-1.0, np.nan)
    base = out.loc[out.criterion == "none", "iou_pruned"]
    reference = float(base.iloc[0]) if len(base) else np.nan
    out["iou_drop_pruned"] = reference - out["iou_pruned"]
    out["iou_drop_finetuned"] = reference - out["iou_finetuned"]
    order = KEYS + ["seeds"] + [c for n in NUMBERS for c in (n, f"{n}_std")] + \
        ["iou_drop_pruned", "iou_drop_finetuned"]
    return out[order]


STAGES = ("pruned", "finetuned")
ANSWER_COLUMNS = (["criterion", "layers", "tolerance"]
                  + [f"{n}_{stage}" for stage in STAGES
                     for n in ("sparsity", "maps_removed", "parameters", "iou_drop")]
                  + ["maps_removed_threshold", "parameters_threshold",
                     "iou_drop_threshold_pruned", "iou_drop_threshold_finetuned"])


def answer(summary: pd.DataFrame, tolerance: float = 0.01) -> pd.DataFrame:
    """Per criterion and layer set, the largest sparsity within ``tolerance`` of the unpruned
    IoU, before and after fine-tuning, and what the threshold rows did (see the module docs)."""
    rows = []
    pruned = summary[summary.criterion != "none"]
    for (criterion, layers), group in pruned.groupby(["criterion", "layers"], sort=False):
        levels = group[group.sparsity.notna()].sort_values("sparsity")
        row = {"criterion": criterion, "layers": layers, "tolerance": tolerance}
        for stage in STAGES:
            drops = levels[f"iou_drop_{stage}"].to_numpy(dtype=float)
            ok = np.cumprod(drops <= tolerance + 1e-12).astype(bool)  # NaN counts as a miss
            best = levels[ok].tail(1)
            row[f"sparsity_{stage}"] = float(best.sparsity.iloc[0]) if len(best) else 0.0
            row[f"maps_removed_{stage}"] = float(best.maps_removed.iloc[0]) if len(best) else 0.0
            row[f"parameters_{stage}"] = float(best.parameters.iloc[0]) if len(best) else np.nan
            row[f"iou_drop_{stage}"] = float(best[f"iou_drop_{stage}"].iloc[0]) \
                if len(best) else np.nan
        threshold = group[group.sparsity.isna()].head(1)  # one threshold per criterion
        for column, source in (("maps_removed_threshold", "maps_removed"),
                               ("parameters_threshold", "parameters"),
                               ("iou_drop_threshold_pruned", "iou_drop_pruned"),
                               ("iou_drop_threshold_finetuned", "iou_drop_finetuned")):
            row[column] = float(threshold[source].iloc[0]) if len(threshold) else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=ANSWER_COLUMNS)


__all__ = ["answer", "summarise"]
