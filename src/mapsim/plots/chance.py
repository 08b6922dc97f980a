"""Intervals and chance levels for the pictures: what each heat-map cell adds to its value.

Reads, when the run wrote them (nothing is marked when they are absent):

- ``summary.csv``'s ``ci_low``, ``ci_high`` (and ``layer_similarity_summary.csv``'s for a
  layer-level metric): the bootstrap confidence interval over images of each mean;
- ``baselines.csv`` (``metric, model_a, layer_a, model_b, layer_b, threshold, statistic,
  baseline, observed, mean, p95, n, above``): chance levels; a cell is *not above chance*
  when its ``spatial-null`` row has ``above`` false (observed not above the null's 95th
  percentile); ``untrained`` rows are what the statistic reads before any learning;
- ``map_pvalues.csv`` (``metric, model_a, layer_a, model_b, layer_b, map, partner,
  observed, p, q, significant``): per map, its best partner's empirical p-value and the
  Benjamini-Hochberg decision;
- ``layer_similarity.csv``'s ``p`` (CKA with images as samples): the permutation p-value of
  a layer pair's value; such a cell is *not above chance* when ``p >= ALPHA``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mapsim.io.results import ResultsDir

#: the baseline whose 95th percentile decides "above chance"
SPATIAL_NULL = "spatial-null"
UNTRAINED = "untrained"
#: the widest interval text drawn in a cell, in characters ("0.78–0.84" is 9)
INTERVAL_CHARS = 10
#: the third line of a cell that is not above chance
BELOW_CHANCE = "≤ chance"
#: a layer metric's permutation p-value at or above this is not above chance
ALPHA = 0.05


def _truth(values: pd.Series) -> pd.Series:
    """``above`` read as booleans whether the CSV wrote True/False, true/false or 1/0
    (NaN where missing or unreadable)."""
    text = values.astype(str).str.strip().str.lower()
    out = pd.Series(np.nan, index=values.index, dtype=float)
    out[text.isin(["true", "1", "1.0", "yes"])] = 1.0
    out[text.isin(["false", "0", "0.0", "no"])] = 0.0
    return out


def _select(frame: pd.DataFrame, metric: str, a: str, b: str) -> pd.DataFrame:
    sel = frame[(frame["metric"].astype(str) == metric) & (frame["model_a"].astype(str) == a)
                & (frame["model_b"].astype(str) == b)].copy()
    for col in ("layer_a", "layer_b"):
        sel[col] = sel[col].astype(str)
    return sel


def _grid(sel: pd.DataFrame, column: str, rows: list[str], cols: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(np.nan, index=rows, columns=cols, dtype=float)
    values = pd.to_numeric(sel[column], errors="coerce") if column in sel else None
    if values is None:
        return out
    for la, lb, v in zip(sel["layer_a"], sel["layer_b"], values):
        if la in out.index and lb in out.columns and math.isnan(out.at[la, lb]):
            out.at[la, lb] = v
    return out


def interval_grids(summary: pd.DataFrame | None, metric: str, a: str, b: str, statistic: str,
                   rows: list[str], cols: list[str]
                   ) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(ci_low, ci_high), layer_a x layer_b, of one statistic; None when the table has no
    intervals (a run with ``statistics.confidence: null`` or from before intervals)."""
    if summary is None or summary.empty or not {"ci_low", "ci_high"} <= set(summary.columns):
        return None
    sel = _select(summary, metric, a, b)
    sel = sel[sel["statistic"].astype(str) == statistic]
    return _grid(sel, "ci_low", rows, cols), _grid(sel, "ci_high", rows, cols)


def baselines(results: ResultsDir) -> pd.DataFrame | None:
    """``baselines.csv`` with ``above`` as 1.0/0.0/NaN, or None when the run has none."""
    frame = results.table("baselines")
    if frame is None or frame.empty:
        return None
    needed = {"metric", "model_a", "layer_a", "model_b", "layer_b", "statistic", "baseline",
              "p95", "above"}
    if not needed <= set(frame.columns):
        return None  # not the contract's table: draw no marks rather than wrong ones
    frame = frame.copy()
    frame["above"] = _truth(frame["above"])
    return frame


def chance_grids(table: pd.DataFrame | None, metric: str, a: str, b: str, statistic: str,
                 rows: list[str], cols: list[str], baseline: str = SPATIAL_NULL
                 ) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(above, p95) of one baseline, layer_a x layer_b: ``above`` 1.0 (above chance), 0.0
    (not above) or NaN (no row); ``p95`` the baseline's 95th percentile. None without rows."""
    if table is None:
        return None
    sel = _select(table, metric, a, b)
    sel = sel[(sel["statistic"].astype(str) == statistic)
              & (sel["baseline"].astype(str) == baseline)]
    if sel.empty:
        return None
    return _grid(sel, "above", rows, cols), _grid(sel, "p95", rows, cols)


def permutation_grid(table: pd.DataFrame | None, metric: str, a: str, b: str,
                     rows: list[str], cols: list[str]) -> pd.DataFrame | None:
    """``above`` (1.0 where ``p < ALPHA``, 0.0 where not, NaN where no p), layer_a x layer_b,
    from ``layer_similarity.csv``'s permutation p-values; None when the metric gave none."""
    if table is None or table.empty or "p" not in table.columns:
        return None
    sel = _select(table, metric, a, b)
    sel = sel[pd.to_numeric(sel["p"], errors="coerce").notna()]
    if sel.empty:
        return None
    p = _grid(sel, "p", rows, cols)
    return (p < ALPHA).astype(float).where(p.notna())


def significance(results: ResultsDir) -> pd.DataFrame | None:
    """Per layer pair of ``map_pvalues.csv``: ``n_maps`` tested and ``n_significant`` (best
    partner significant after Benjamini-Hochberg). None when the run wrote no p-values."""
    frame = results.table("map_pvalues")
    if frame is None or frame.empty or "significant" not in frame:
        return None
    keys = ["metric", "model_a", "layer_a", "model_b", "layer_b"]
    frame = frame.assign(significant=_truth(frame["significant"]).fillna(0.0))
    out = frame.groupby(keys, sort=False).agg(n_maps=("significant", "size"),
                                              n_significant=("significant", "sum"))
    out["n_significant"] = out["n_significant"].astype(int)
    return out.reset_index()


def interval_text(low: float, high: float, fmt: str) -> str:
    """``"low–high"`` in the cell's number format, with fewer decimals when that would be
    wider than :data:`INTERVAL_CHARS` characters (e.g. large distances)."""
    spec = fmt
    for decimals in range(_decimals(fmt), -1, -1):
        spec = f".{decimals}f"
        text = f"{_minus(format(low, spec))}–{_minus(format(high, spec))}"
        if len(text) <= INTERVAL_CHARS:
            return text
    for digits in (1, 0):  # very large or small numbers: a short exponent ("1.2e5")
        text = f"{_minus(_exp(low, digits))}–{_minus(_exp(high, digits))}"
        if len(text) <= INTERVAL_CHARS:
            return text
    return text


def _exp(value: float, digits: int) -> str:
    mantissa, _, exponent = format(value, f".{digits}e").partition("e")
    return f"{mantissa}e{int(exponent)}"


def _decimals(fmt: str) -> int:
    try:
        return int(fmt.lstrip(".").rstrip("fFeEgG%") or 2)
    except ValueError:
        return 2


def _minus(text: str) -> str:
    return text.replace("-", "−")  # a true minus: not read as the interval's dash
