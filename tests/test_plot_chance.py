"""Heat maps and report show each value's interval and whether it is above chance.

The chance tables (baselines.csv, map_pvalues.csv) are written here by hand, in the results
contract's columns, next to a real run's tables: every expected cell text is rebuilt from
summary.csv with plain pandas and the rule stated in the docs (not from the drawing code).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle

from mapsim.io.results import ResultsDir
from mapsim.plots import chance, heatmaps
from mapsim.plots.draw import redraw
from mapsim.plots.observer import observers_for
from mapsim.runner.run import run as run_spec
from mapsim.spec.run_spec import validate_spec

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
PAIR = ["metric", "model_a", "layer_a", "model_b", "layer_b"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    spec = validate_spec({
        "name": "chance",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 2, "width": 5}, "seed": 1},
                   "b": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 2}},
        "layers": {"a": {"L1": "blocks.0", "L2": "blocks.1"},
                   "b": {"L1": "blocks.0", "L2": "blocks.1"}},
        "images": {"name": "files", "paths": [str(DATA / "vessels-1.png"),
                                              str(DATA / "vessels-2.png")]},
        "comparisons": [["a", "a"], ["a", "b"]],
        "aggregators": ["max", {"name": "threshold", "value": 0.6}, "pivot"],
        "output": {"report": True},
    })
    return run_spec(spec, out_dir=tmp_path_factory.mktemp("chance") / "out", progress=False,
                    observers=observers_for(spec.output)).out_dir


def is_above(layer_a: str, layer_b: str) -> bool:
    """The planted rule: a pair is above chance when its layers share their label."""
    return layer_a == layer_b


def write_baselines(root: Path, above_as: str = "bool") -> pd.DataFrame:
    """Spatial-null rows following :func:`is_above` (but none for a -> b L2/L1), and
    untrained rows that are never above (they must not mark anything)."""
    summary = pd.read_csv(root / "summary.csv", dtype=str)
    rows = summary[summary.statistic.isin(["best_mean", "pct_well"])][
        [*PAIR, "threshold", "statistic", "mean"]].rename(columns={"mean": "observed"})
    rows = rows[~((rows.model_a == "a") & (rows.model_b == "b") & (rows.layer_a == "L2")
                  & (rows.layer_b == "L1"))]
    out = []
    for baseline in ("spatial-null", "untrained"):
        part = rows.copy()
        part["baseline"] = baseline
        part["mean"], part["p95"], part["n"] = 0.1, 0.2, 100
        above = [is_above(la, lb) and baseline == "spatial-null"
                 for la, lb in zip(part.layer_a, part.layer_b)]
        part["above"] = [str(v).lower() if above_as == "text" else v for v in above]
        out.append(part)
    table = pd.concat(out)[[*PAIR, "threshold", "statistic", "baseline", "observed", "mean",
                            "p95", "n", "above"]]
    table.to_csv(root / "baselines.csv", index=False)
    return table


def write_pvalues(root: Path) -> None:
    """Per map of a L1 -> b L1 (5 maps): the first 3 significant; of a L2 -> b L2: none."""
    rows = []
    for la, lb, n_sig in (("L1", "L1", 3), ("L2", "L2", 0)):
        for m in range(5):
            rows.append({"metric": "pearson", "model_a": "a", "layer_a": la, "model_b": "b",
                         "layer_b": lb, "map": m, "partner": 0, "observed": 0.5,
                         "p": 0.001 if m < n_sig else 0.5, "q": 0.004 if m < n_sig else 0.6,
                         "significant": m < n_sig})
    pd.DataFrame(rows).to_csv(root / "map_pvalues.csv", index=False)


@pytest.fixture
def with_chance(run_dir, tmp_path) -> Path:
    root = tmp_path / "out"
    shutil.copytree(run_dir, root)
    write_baselines(root)
    write_pvalues(root)
    return root


def expected_text(summary: pd.DataFrame, key: tuple[str, ...], statistic: str, fmt: str,
                  marked: bool) -> str:
    row = summary[(summary[PAIR].astype(str).apply(tuple, axis=1) == key)
                  & (summary.statistic == statistic)].iloc[0]
    text = format(float(row["mean"]), fmt)
    if np.isfinite(row.ci_low) and np.isfinite(row.ci_high):
        text += "\n" + f"{format(row.ci_low, fmt)}–{format(row.ci_high, fmt)}".replace("-", "−")
    elif np.isfinite(row["std"]):
        text += f"\n±{format(row['std'], fmt)}"
    return text + ("\n≤ chance" if marked else "")


def test_interval_text_hand_cases() -> None:
    assert chance.interval_text(0.781, 0.8449, ".2f") == "0.78–0.84"
    assert chance.interval_text(-0.124, 0.3, ".2f") == "−0.12–0.30"  # a true minus sign
    assert chance.interval_text(65.24, 78.0, ".1f") == "65.2–78.0"
    # too wide at the cell's format: fewer decimals, never more than INTERVAL_CHARS
    assert chance.interval_text(1234.5, 5678.9, ".2f") == "1234–5679"
    for low, high in ((-123456.0, 98765.0), (12.345, 15.678)):
        assert len(chance.interval_text(low, high, ".2f")) <= chance.INTERVAL_CHARS


def test_above_is_read_from_every_spelling_a_csv_may_hold() -> None:
    values = pd.Series(["True", "false", "1", "0", "", None, "yes"])
    got = chance._truth(values).tolist()
    assert got[:4] == [1.0, 0.0, 1.0, 0.0] and np.isnan(got[4]) and np.isnan(got[5])
    assert got[6] == 1.0


@pytest.mark.parametrize("above_as", ["bool", "text"])
def test_cells_show_their_interval_and_marks_where_not_above_chance(run_dir, tmp_path,
                                                                   above_as) -> None:
    root = tmp_path / "out"
    shutil.copytree(run_dir, root)
    write_baselines(root, above_as)
    summary = pd.read_csv(root / "summary.csv", dtype={c: str for c in PAIR})
    assert np.isfinite(summary.ci_low).any(), "the run should have intervals to show"
    sets = {s.key: s for s in heatmaps.heatmap_sets(ResultsDir.open(root))}
    n_marked = 0
    for statistic, fmt in (("best_mean", ".2f"), ("pct_well", ".1f")):
        hs = sets[f"heatmap-pearson-{statistic}"]
        assert "confidence interval" in hs.title and "≤ chance" in hs.title
        for panel in hs.panels:
            texts = heatmaps.annotations(panel, fmt)
            for (i, j), text in np.ndenumerate(texts):
                la, lb = str(panel.mean.index[i]), str(panel.mean.columns[j])
                missing = (panel.model_a, panel.model_b, la, lb) == ("a", "b", "L2", "L1")
                marked = not is_above(la, lb) and not missing
                n_marked += marked
                key = ("pearson", panel.model_a, la, panel.model_b, lb)
                assert text == expected_text(summary, key, statistic, fmt, marked), key
        # the picture: one dashed frame per marked cell, every text inside its cell
        fig = heatmaps.draw_set(hs)
        frames = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle)]
        marked_here = sum(str(t).endswith("≤ chance") for p in hs.panels
                          for t in heatmaps.annotations(p, fmt).ravel())
        assert len(frames) == marked_here > 0
    assert n_marked > 0
    # per-image sets have no interval and no marks (one image: nothing to resample)
    assert all(p.above is None and p.low is None
               for s in sets.values() if s.image is not None for p in s.panels)


def test_without_chance_tables_or_intervals_nothing_is_marked(run_dir, tmp_path) -> None:
    root = tmp_path / "out"
    shutil.copytree(run_dir, root)
    for name in ("baselines.csv", "map_pvalues.csv"):  # a run without chance levels
        (root / name).unlink(missing_ok=True)
    summary = pd.read_csv(root / "summary.csv")
    summary.drop(columns=["ci_low", "ci_high", "ci_method"]).to_csv(root / "summary.csv",
                                                                   index=False)
    hs = {s.key: s for s in heatmaps.heatmap_sets(ResultsDir.open(root))}[
        "heatmap-pearson-best_mean"]
    assert hs.title.endswith("mean ± std over 2 image(s)")
    for panel in hs.panels:
        assert panel.above is None and panel.low is None
        texts = heatmaps.annotations(panel, ".2f")
        for (i, j), text in np.ndenumerate(texts):
            assert text == f"{panel.mean.iat[i, j]:.2f}\n±{panel.std.iat[i, j]:.2f}"
    # a table that is not the contract's (no 'above' column) draws no marks either
    pd.DataFrame({"metric": ["pearson"], "p95": [0.5]}).to_csv(root / "baselines.csv",
                                                              index=False)
    assert chance.baselines(ResultsDir.open(root)) is None


def test_data_json_and_report_carry_intervals_chance_and_p_values(with_chance) -> None:
    redraw(with_chance, report=True)
    data = json.loads((with_chance / "plots" / "data.json").read_text())
    mean_set = next(s for s in data["heatmaps"] if s["key"] == "heatmap-pearson-best_mean")
    panel = next(p for p in mean_set["panels"] if (p["model_a"], p["model_b"]) == ("a", "b"))
    assert panel["above_chance"] == [[1.0, 0.0], [None, 1.0]]  # rows L1, L2; cols L1, L2
    assert panel["chance_p95"][0][0] == pytest.approx(0.2)
    summary = pd.read_csv(with_chance / "summary.csv", dtype={c: str for c in PAIR})
    row = summary[(summary.model_a == "a") & (summary.model_b == "b") & (summary.layer_a == "L2")
                  & (summary.layer_b == "L2") & (summary.statistic == "best_mean")].iloc[0]
    assert panel["ci_low"][1][1] == pytest.approx(row.ci_low, abs=1e-6)
    assert panel["ci_high"][1][1] == pytest.approx(row.ci_high, abs=1e-6)

    text = (with_chance / "report.html").read_text(encoding="utf-8")
    assert "Reading the numbers" in text and "spatial null" in text
    assert "Benjamini-Hochberg" in text and "confidence interval" in text
    # the findings: a -> b L1 with L1 is above chance, its 3 of 5 maps significant
    findings = text[text.index("class='info findings'"):]
    findings = findings[:findings.index("</table>")]
    head = re.findall(r"<th>([^<]*)</th>", findings)
    assert head[:4] == ["metric", "comparison", "layer", "partner"]
    assert {"interval", "null p95", "above chance", "untrained p95",
            "significant maps"} <= set(head)
    rows = [re.findall(r"<td>([^<]*)</td>", r) for r in findings.split("<tr>")[2:]]
    by_key = {(r[1], r[2]): dict(zip(head, r)) for r in rows}
    assert by_key[("a → b", "L1")]["significant maps"] == "3 of 5"
    # the significance per comparison: 3 of the 10 maps tested between a and b
    sig = text[text.index("class='info significance'"):]
    sig = sig[:sig.index("</table>")]
    cells = re.findall(r"<td>([^<]*)</td>", sig)
    assert cells[:4] == ["pearson", "a → b", "3", "10"]
    # the cells not above chance are framed in the report's tables too
    marked = len(re.findall(r"<td class='cell nochance'", text))
    marked_png = sum(1 for s in data["heatmaps"] if s["image"] is None
                     for p in s["panels"] for row in (p.get("above_chance") or [])
                     for v in row if v == 0.0)
    assert marked == marked_png > 0
    # the detail view's data: both baselines of a pair and its significant maps
    payload = json.loads(re.search(r"id=\"mapsim-data\">(.*?)</script>", text, re.S)
                         .group(1).replace("<\\/", "</"))
    pair = next(p for p in payload["pairs"] if not p["layer_level"]
                and (p["model_a"], p["layer_a"], p["model_b"], p["layer_b"])
                == ("a", "L1", "b", "L1"))
    assert pair["significant"] == [3, 5]
    assert {(b["statistic"], b["baseline"]) for b in pair["baselines"]} == {
        (s, b) for s in ("best_mean", "pct_well") for b in ("spatial-null", "untrained")}
    assert {"ci_low", "ci_high"} <= set(pair["summary"][0])


def test_a_layer_level_metric_shows_the_intervals_of_its_summary(tmp_path) -> None:
    """CKA-like values: the interval comes from layer_similarity_summary.csv; a symmetric
    metric's missing direction (a y -> a x) is read from the other (a x -> a y)."""
    root = tmp_path / "r"
    root.mkdir()
    per_image = [("i1", "a", "x", "a", "x", 1.0), ("i1", "a", "x", "a", "y", 0.4),
                 ("i1", "a", "y", "a", "y", 1.0), ("i2", "a", "x", "a", "x", 1.0),
                 ("i2", "a", "x", "a", "y", 0.6), ("i2", "a", "y", "a", "y", None),
                 ("i1", "a", "x", "b", "z", 0.2), ("i2", "a", "x", "b", "z", 0.5)]
    frame = pd.DataFrame(per_image, columns=["image", "model_a", "layer_a", "model_b",
                                             "layer_b", "value"])
    frame.insert(1, "metric", "cka")
    frame.to_csv(root / "layer_similarity.csv", index=False)
    (root / "run.json").write_text(json.dumps({
        "spec": {"name": "syn"}, "comparisons": [["a", "a"], ["a", "b"]],
        "models": {"a": {"layers": {"x": "x", "y": "y"}}, "b": {"layers": {"z": "z"}}},
        "metrics": [{"name": "cka", "label": "cka", "granularity": "layer",
                     "higher_is_more_similar": True, "symmetric": True,
                     "value_range": [0.0, 1.0]}]}))
    rows = [("a", "x", "a", "x", 1.0, 1.0), ("a", "x", "a", "y", 0.35, 0.65),
            ("a", "x", "b", "z", 0.15, 0.55)]
    pd.DataFrame([{"metric": "cka", "model_a": a, "layer_a": la, "model_b": b, "layer_b": lb,
                   "statistic": "value", "mean": (lo + hi) / 2, "std": 0.1, "n_images": 2,
                   "ci_low": lo, "ci_high": hi, "ci_method": "percentile"}
                  for a, la, b, lb, lo, hi in rows]).to_csv(
        root / "layer_similarity_summary.csv", index=False)
    hs = {s.key: s for s in heatmaps.heatmap_sets(ResultsDir.open(root))}["heatmap-cka-value"]
    intra, inter = hs.panels
    texts = heatmaps.annotations(intra, hs.fmt)
    assert texts[0, 1] == "0.50\n0.35–0.65"  # x with y: mean of 0.4 and 0.6
    assert texts[1, 0] == "0.50\n0.35–0.65"  # y with x: from the other direction
    assert texts[1, 1] == "1.00"  # one defined image: no interval, no std
    assert heatmaps.annotations(inter, hs.fmt)[0, 0] == "0.35\n0.15–0.55"
    assert "confidence interval" in hs.title and "chance" not in hs.title


def test_a_layer_level_metric_is_marked_by_its_permutation_p_value(tmp_path) -> None:
    """CKA over images: one all-images row per layer pair with its permutation p; a cell is
    marked not above chance exactly where p >= 0.05 (rule in docs/pictures-and-report.md),
    a symmetric metric's other direction read from the row it has; no p, no mark."""
    root = tmp_path / "r"
    root.mkdir()
    rows = [("a", "x", "a", "x", 1.0, 0.001), ("a", "x", "a", "y", 0.3, 0.05),
            ("a", "y", "a", "y", 1.0, 0.001), ("a", "x", "b", "z", 0.6, 0.01),
            ("a", "y", "b", "z", 0.2, 0.4), ("a", "x", "b", "w", 0.7, None)]
    pd.DataFrame([{"image": "all-images", "metric": "cka", "model_a": a, "layer_a": la,
                   "model_b": b, "layer_b": lb, "value": v, "reason": None, "p": p}
                  for a, la, b, lb, v, p in rows]).to_csv(root / "layer_similarity.csv",
                                                          index=False)
    (root / "run.json").write_text(json.dumps({
        "spec": {"name": "syn"}, "comparisons": [["a", "a"], ["a", "b"]],
        "models": {"a": {"layers": {"x": "x", "y": "y"}},
                   "b": {"layers": {"z": "z", "w": "w"}}},
        "metrics": [{"name": "cka", "label": "cka", "granularity": "layer",
                     "higher_is_more_similar": True, "symmetric": True,
                     "value_range": [0.0, 1.0]}]}))
    hs = {s.key: s for s in heatmaps.heatmap_sets(ResultsDir.open(root))}["heatmap-cka-value"]
    intra, inter = hs.panels
    marked = lambda panel: [[chance.BELOW_CHANCE in t for t in row]  # noqa: E731
                            for row in heatmaps.annotations(panel, hs.fmt)]
    # x-y has p = 0.05 (not below alpha), in both directions of the symmetric metric
    assert marked(intra) == [[False, True], [True, False]]
    # columns z, w: y-z p = 0.4 is marked; x-w has no p, so it is not
    assert marked(inter) == [[False, False], [True, False]]
    assert "permutation p >= 0.05" in hs.title
