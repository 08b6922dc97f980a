"""What ``mapsim run`` prints when a run ends: the main files and the findings per comparison.

Read from a results directory (``summary.csv`` and ``run.json``), so it works for any run.
Within a model each layer is shown with itself; between two models, each layer of the first
with its closest layer of the second (the highest mean best value of a similarity metric, the
lowest of a distance), which is the question "where does this layer reappear?".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the files named one by one in the list; everything else is counted per folder
MAIN_FILES = ("report.html", "summary.csv", "pivot.csv", "max.csv", "layer_similarity.csv",
              "run.json")


def files_list(out_dir: Path) -> str:
    """The main files of a results directory, then each folder with its number of files."""
    out_dir = Path(out_dir)
    lines = [f"  {name}" for name in MAIN_FILES if (out_dir / name).is_file()]
    others = sorted(p.name for p in out_dir.iterdir()
                    if p.is_file() and p.name not in MAIN_FILES and not p.name.startswith("."))
    if others:
        lines.append("  also: " + ", ".join(others))
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir()
                         and not p.name.startswith(".")):
        count = sum(1 for p in folder.rglob("*") if p.is_file())
        lines.append(f"  {folder.name}/ ({count} file{'s' if count != 1 else ''})")
    return "\n".join(lines)


def _higher(info: dict[str, Any]) -> dict[str, bool]:
    return {m.get("label", m.get("name")): bool(m.get("higher_is_more_similar", True))
            for m in info.get("metrics", [])}


def findings_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Per metric, comparison direction and layer of model_a: the partner layer shown, its
    mean best value and mean % well correlated (means over images, from summary.csv)."""
    import pandas as pd

    out_dir = Path(out_dir)
    path = out_dir / "summary.csv"
    if not path.is_file():
        return []
    info_path = out_dir / "run.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    higher = _higher(info)
    summary = pd.read_csv(path, dtype={"layer_a": str, "layer_b": str, "model_a": str,
                                       "model_b": str, "metric": str})
    wide = summary[summary.statistic.isin(["best_mean", "pct_well"])].pivot_table(
        index=["metric", "model_a", "layer_a", "model_b", "layer_b"], columns="statistic",
        values="mean", sort=False).reset_index()
    if wide.empty or not {"best_mean", "pct_well"} <= set(wide.columns):
        return []
    rows = []
    for (metric, a, b), part in wide.groupby(["metric", "model_a", "model_b"], sort=False):
        for layer, options in part.groupby("layer_a", sort=False):
            if a == b:
                chosen = options[options.layer_b == layer]
            else:
                defined = options.dropna(subset=["best_mean"])
                if defined.empty:
                    continue
                best = (defined.best_mean.idxmax() if higher.get(metric, True)
                        else defined.best_mean.idxmin())
                chosen = defined.loc[[best]]
            if chosen.empty:
                continue
            row = chosen.iloc[0]
            rows.append({"metric": metric, "model_a": a, "model_b": b, "layer": layer,
                         "partner": row.layer_b, "best_mean": float(row.best_mean),
                         "pct_well": float(row.pct_well)})
    return rows


def findings_table(out_dir: Path) -> str:
    """The findings of every comparison (within and between models) as one compact table."""
    rows = findings_rows(out_dir)
    if not rows:
        return ""
    for r in rows:
        r["comparison"] = (f"{r['model_a']} × {r['model_a']}" if r["model_a"] == r["model_b"]
                           else f"{r['model_a']} → {r['model_b']}")
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows))
              for k in ("metric", "comparison", "layer", "partner")}
    head = (f"  {'metric':<{widths['metric']}}  {'comparison':<{widths['comparison']}}  "
            f"{'layer':<{widths['layer']}}  {'partner':<{widths['partner']}}  "
            f"{'mean best':>9}  {'% well':>6}")
    lines = ["", "Findings, means over images (within a model: each layer with itself;",
             "between models: each layer with its closest layer of the other):", head]
    for r in rows:
        lines.append(f"  {r['metric']:<{widths['metric']}}  {r['comparison']:<{widths['comparison']}}"
                     f"  {r['layer']:<{widths['layer']}}  {r['partner']:<{widths['partner']}}  "
                     f"{r['best_mean']:>9.3f}  {r['pct_well']:>6.1f}")
    return "\n".join(lines)


def timings_line(info: dict[str, Any]) -> str:
    """``analysis 32.7 s; pictures 12.1 s`` from run.json's timings (empty when absent)."""
    timings = info.get("timings_s", {})
    parts = []
    if "total" in timings:
        parts.append(f"analysis {float(timings['total']):.1f} s")
    if "draw" in timings:
        parts.append(f"pictures {float(timings['draw']):.1f} s")
    return "; ".join(parts)
