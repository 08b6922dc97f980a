"""The report's tables of findings: each value with its interval, chance levels and p-values.

One row per comparison direction and layer (within a model each layer with itself, between
models each layer with its closest layer of the other, as the terminal summary), and per
comparison the maps whose best partner is significant after Benjamini-Hochberg. Columns
without data in the run (no intervals, no ``baselines.csv``, no ``map_pvalues.csv``) are left
out, so a run without them reads as before.
"""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd

from mapsim.io.results import ResultsDir
from mapsim.plots import chance
from mapsim.run_summary import findings_rows

#: the paragraph that says what the report's numbers are
READING = (
    "<p class='reading'><b>Reading the numbers.</b> Each value is a mean over the run's "
    "images: <i>mean best</i> is the mean over a layer's maps of each map's best-partner "
    "value in the other layer, <i>% well</i> the share of maps whose best partner passes "
    "the threshold. The <i>interval</i> below a value (heat-map cells, and the "
    "<i>{level}interval</i> columns) is a bootstrap confidence interval over images "
    "(summary.csv's <code>ci_low</code>, <code>ci_high</code>): how much the mean could "
    "change with other images of the same kind; with one image there is none and the cells "
    "show ±std where known. The <i>chance level</i> (<code>baselines.csv</code>) is what "
    "the statistic reads when the maps are unrelated but keep their spatial statistics "
    "(the <i>spatial null</i>: its mean and 95th percentile, <i>null p95</i>); a value not "
    "above the null p95 is marked <i>{below}</i> with a dashed frame: it says nothing "
    "beyond chance. The <i>untrained</i> baseline is what the same architectures read at "
    "random initialisation, before any learning. Per map, the best partner's empirical "
    "p-value against the null is corrected for the number of maps (Benjamini-Hochberg, "
    "<code>map_pvalues.csv</code>); <i>significant maps</i> counts the maps whose best "
    "partner stays significant (q &lt; {fdr:g}).</p>")


def reading(results: ResultsDir) -> str:
    """:data:`READING` with the run's interval level."""
    level = (results.info.get("intervals") or {}).get("level")
    text = f"{100 * float(level):g}% " if level else ""
    fdr = ((results.info.get("null") or {}).get("pvalues") or {}).get("fdr", 0.05)
    return READING.format(level=text, below=html.escape(chance.BELOW_CHANCE), fdr=float(fdr))


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(float(value), fmt)


def _interval(low: Any, high: Any, fmt: str) -> str:
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (low, high)):
        return "—"
    return chance.interval_text(float(low), float(high), fmt)


def _lookup(frame: pd.DataFrame | None, keys: list[str]) -> dict[tuple[str, ...], dict]:
    """The first row of each key, as a dict, by the key's values as text."""
    if frame is None or frame.empty:
        return {}
    return {tuple(str(v) for v in key): part.iloc[0].to_dict()
            for key, part in frame.groupby(keys, sort=False)}


_PAIR = ["metric", "model_a", "layer_a", "model_b", "layer_b"]


def findings_html(results: ResultsDir) -> str:
    """The findings table with, where the run has them, intervals, chance levels and the
    number of significant maps."""
    rows = findings_rows(results.root)
    if not rows:
        return ""
    summary = results.summary
    has_ci = {"ci_low", "ci_high"} <= set(summary.columns)
    ci = _lookup(summary, [*_PAIR, "statistic"]) if has_ci else {}
    null = chance.baselines(results)
    base = _lookup(null, [*_PAIR, "statistic", "baseline"]) if null is not None else {}
    has_untrained = null is not None and (null["baseline"].astype(str) == chance.UNTRAINED).any()
    sig_frame = chance.significance(results)
    sig = _lookup(sig_frame, _PAIR) if sig_frame is not None else {}
    head = ["metric", "comparison", "layer", "partner"]
    stats = (("best_mean", "mean best", ".3f"), ("pct_well", "% well", ".1f"))
    for _, name, _ in stats:
        head.append(name)
        if has_ci:
            head.append("interval")
        if base:
            head += ["null mean", "null p95", "above chance"]
        if has_untrained:
            head.append("untrained p95")
    if sig:
        head.append("significant maps")
    lines = ["<table class='info findings'><tr>"
             + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        a, b = row["model_a"], row["model_b"]
        key = (row["metric"], a, row["layer"], b, row["partner"])
        arrow = f"{a} × {b}" if a == b else f"{a} → {b}"
        cells = [row["metric"], arrow, row["layer"], row["partner"]]
        for stat, _, fmt in stats:
            cells.append(_cell(row[stat], fmt))
            if has_ci:
                rec = ci.get((*key, stat), {})
                cells.append(_interval(rec.get("ci_low"), rec.get("ci_high"), fmt))
            if base:
                rec = base.get((*key, stat, chance.SPATIAL_NULL), {})
                above = rec.get("above")
                cells += [_cell(rec.get("mean"), fmt), _cell(rec.get("p95"), fmt),
                          "—" if above is None or above != above else
                          ("yes" if above else f"no ({chance.BELOW_CHANCE})")]
            if has_untrained:
                cells.append(_cell(base.get((*key, stat, chance.UNTRAINED), {}).get("p95"),
                                   fmt))
        if sig:
            rec = sig.get(key)
            cells.append("—" if rec is None else
                         f"{int(rec['n_significant'])} of {int(rec['n_maps'])}")
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                     + "</tr>")
    lines.append("</table>")
    return ("<p>Per comparison, each layer with itself (within a model) or with its closest "
            "layer of the other model (between models), means over images:</p>"
            + "".join(lines))


def significance_html(results: ResultsDir) -> str:
    """Per comparison direction: maps whose best partner is significant after
    Benjamini-Hochberg, of the maps tested (``map_pvalues.csv``); empty without it."""
    sig = chance.significance(results)
    if sig is None:
        return ""
    total = sig.groupby(["metric", "model_a", "model_b"], sort=False)[
        ["n_significant", "n_maps"]].sum().reset_index()
    lines = ["<table class='info significance'><tr><th>metric</th><th>comparison</th>"
             "<th>maps with a significant best partner (BH)</th><th>maps tested</th>"
             "<th>share</th></tr>"]
    for rec in total.itertuples(index=False):
        arrow = f"{rec.model_a} × {rec.model_b}" if rec.model_a == rec.model_b else \
            f"{rec.model_a} → {rec.model_b}"
        share = 100.0 * rec.n_significant / rec.n_maps if rec.n_maps else float("nan")
        lines.append(f"<tr><td>{html.escape(str(rec.metric))}</td><td>{html.escape(arrow)}"
                     f"</td><td>{int(rec.n_significant)}</td><td>{int(rec.n_maps)}</td>"
                     f"<td>{_cell(share, '.1f')} %</td></tr>")
    lines.append("</table>")
    return ("<p>Maps whose best partner is significant against the spatial null after the "
            "Benjamini-Hochberg correction, per comparison (all layer pairs):</p>"
            + "".join(lines))


def pair_extras(results: ResultsDir) -> dict[tuple[str, ...], dict[str, Any]]:
    """For the report's detail view, per layer pair: its baselines rows and significance."""
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    null = chance.baselines(results)
    if null is not None:
        keep = [c for c in ("statistic", "baseline", "observed", "mean", "p95", "n", "above")
                if c in null]
        for key, part in null.groupby(_PAIR, sort=False):
            records = []
            for rec in part[keep].to_dict("records"):
                records.append({k: (None if isinstance(v, float) and v != v else
                                    bool(v) if k == "above" else
                                    v.item() if hasattr(v, "item") else v)
                                for k, v in rec.items()})
            out.setdefault(tuple(str(k) for k in key), {})["baselines"] = records
    sig = chance.significance(results)
    if sig is not None:
        for rec in sig.to_dict("records"):
            key = tuple(str(rec[k]) for k in _PAIR)
            out.setdefault(key, {})["significant"] = [int(rec["n_significant"]),
                                                      int(rec["n_maps"])]
    return out
