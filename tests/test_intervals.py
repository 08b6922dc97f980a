"""Bootstrap confidence intervals over images (mapsim.tables.intervals): coverage by
simulation, agreement with scipy, the edge cases, and what a run writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mapsim.tables.intervals import bootstrap_intervals, with_intervals


def _per_image(values: np.ndarray) -> pd.DataFrame:
    """rows: one per (trial, image); the trial is the key, ``x`` the statistic."""
    trials, n = values.shape
    return pd.DataFrame({"image": np.tile([f"i{k}" for k in range(n)], trials),
                         "trial": np.repeat([f"t{t}" for t in range(trials)], n),
                         "x": values.reshape(-1)})


@pytest.mark.parametrize("draw", ["normal", "skewed"])
def test_intervals_cover_a_known_mean_at_close_to_the_nominal_rate(draw):
    rng = np.random.default_rng(7)
    trials, n = 400, 25
    if draw == "normal":
        values, mean = rng.normal(0.6, 0.1, (trials, n)), 0.6
    else:  # a skewed population (like % well correlated near 0)
        values, mean = rng.exponential(2.0, (trials, n)), 2.0
    table = bootstrap_intervals(_per_image(values), ["trial"], 0.95, resamples=1999)
    assert set(table.ci_method) == {"BCa"}
    covered = ((table.ci_low <= mean) & (mean <= table.ci_high)).mean()
    # 400 trials: the binomial sd of the coverage is about 0.011
    assert 0.91 <= covered <= 0.98, covered


@pytest.mark.parametrize("method, n", [("BCa", 12), ("BCa", 40), ("percentile", 5)])
def test_intervals_agree_with_scipy_bootstrap(method, n):
    """Our bootstrap of the mean (multinomial counts, one matrix product) against
    scipy.stats.bootstrap on the same data: the two draw different resamples, so they agree
    to Monte Carlo error, here within 4 % of the interval's width at 19,999 resamples."""
    rng = np.random.default_rng(n)
    values = rng.exponential(1.0, n)  # skewed: BCa and percentile differ
    table = bootstrap_intervals(_per_image(values[None]), ["trial"], 0.9, resamples=19999,
                                seed=3)
    row = table.iloc[0]
    assert row.ci_method == method
    ref = stats.bootstrap((values,), np.mean, n_resamples=19999, confidence_level=0.9,
                          method=method, rng=np.random.default_rng(4))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert row.ci_low == pytest.approx(ref.confidence_interval.low, abs=0.04 * width)
    assert row.ci_high == pytest.approx(ref.confidence_interval.high, abs=0.04 * width)
    assert row.ci_low < values.mean() < row.ci_high


def test_memory_and_time_grow_with_rows_times_resamples_not_images():
    """1,331 rows of 30 images (a study's summary) at 9,999 resamples: the bootstrap means are
    made chunk by chunk (MAX_CELLS), so this stays small; checked by the result's shape and
    that every row got a BCa interval (no timing asserted)."""
    rng = np.random.default_rng(0)
    table = bootstrap_intervals(_per_image(rng.random((1331, 30))), ["trial"], 0.95)
    assert len(table) == 1331 and set(table.ci_method) == {"BCa"}


def test_threads_give_the_same_intervals_as_one(monkeypatch):
    """Chunks of rows computed by several threads (the default on a machine with several
    CPUs) give the bytes one thread gives: one draw of resamples serves every chunk."""
    import mapsim.tables.intervals as intervals

    monkeypatch.setattr(intervals, "MAX_CELLS", 5 * 999)  # 5 rows a chunk: 13 chunks
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.exponential(1.0, (40, 12)), rng.normal(0, 1, (24, 12))])
    values[3] = 0.5  # a constant row, and a few-image table below (percentile)
    frames = {workers: pd.concat([
        bootstrap_intervals(_per_image(values), ["trial"], 0.95, resamples=999,
                            workers=workers),
        bootstrap_intervals(_per_image(values[:, :6]), ["trial"], 0.95, resamples=999,
                            workers=workers)]) for workers in (1, 3)}
    assert set(frames[1].ci_method) == {"BCa", "percentile", "constant"}
    pd.testing.assert_frame_equal(frames[1], frames[3])


def test_edge_cases_say_why():
    frame = pd.DataFrame({
        "image": ["a", "b", "c", "a", "b", "c", "a", "b", "c"],
        "key": ["same"] * 3 + ["one"] * 3 + ["gaps"] * 3,
        "x": [2.0, 2.0, 2.0, 1.0, np.nan, np.nan, 1.0, np.nan, 3.0],
    })
    table = bootstrap_intervals(frame, ["key"], 0.95, resamples=999).set_index("key")
    assert table.loc["same", "ci_method"] == "constant"
    assert table.loc["same", "ci_low"] == table.loc["same", "ci_high"] == 2.0
    assert table.loc["one", "ci_method"] == "none: 1 image(s) with a value"
    assert np.isnan(table.loc["one", "ci_low"])
    assert table.loc["gaps", "ci_method"] == "percentile"  # NaN images left out; few images
    assert 1.0 <= table.loc["gaps", "ci_low"] <= table.loc["gaps", "ci_high"] <= 3.0


def test_few_images_get_the_percentile_interval_which_is_stable_to_rounding():
    """With 3 images BCa's bias correction jumps with the last bit of a value; the percentile
    interval moves by about as much as the values do."""
    values = np.array([[0.5001, 0.6, 0.55]])
    a = bootstrap_intervals(_per_image(values), ["trial"], 0.95, resamples=999).iloc[0]
    b = bootstrap_intervals(_per_image(values * (1 + 1e-12)), ["trial"], 0.95,
                            resamples=999).iloc[0]
    assert a.ci_method == b.ci_method == "percentile"
    assert abs(a.ci_low - b.ci_low) < 1e-9 and abs(a.ci_high - b.ci_high) < 1e-9


def test_intervals_join_the_summary_rows_in_order():
    summary = pd.DataFrame({"key": ["b", "a"], "statistic": ["x", "x"], "mean": [2.0, 1.0]})
    intervals = pd.DataFrame({"key": ["a", "b"], "statistic": ["x", "x"], "ci_low": [0.5, 1.5],
                              "ci_high": [1.5, 2.5], "ci_method": ["BCa", "BCa"]})
    joined = with_intervals(summary, intervals, ["key"])
    assert joined.key.tolist() == ["b", "a"] and joined.ci_low.tolist() == [1.5, 0.5]


def test_a_run_writes_intervals_that_match_its_per_image_rows(tmp_path):
    """End to end: summary.csv's intervals are the bootstrap of pivot.csv's per-image values;
    the level and method are in run.json; `statistics.confidence: null` turns them off."""
    from pathlib import Path

    from mapsim.runner.run import run
    from mapsim.spec.run_spec import validate_spec

    data = {
        "name": "ci",
        "models": {"m": {"architecture": {"name": "fcn", "depth": 2, "width": 6}, "seed": 2}},
        "layers": {"m": "blocks.*"},
        "images": {"name": "synthetic-vessels", "count": 6, "size": [40, 40], "seed": 4},
        "statistics": {"confidence": 0.9, "resamples": 999},
    }
    out = run(validate_spec(data), out_dir=tmp_path / "on", progress=False).out_dir
    summary = pd.read_csv(out / "summary.csv")
    pivot = pd.read_csv(out / "pivot.csv")
    row = summary[(summary.statistic == "best_mean") & (summary.layer_a == "blocks.1")
                  & (summary.layer_b == "blocks.1")].iloc[0]
    values = pivot[(pivot.layer_a == "blocks.1") & (pivot.layer_b == "blocks.1")].best_mean
    assert row["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert row.ci_low <= row["mean"] <= row.ci_high and row.ci_method == "percentile"
    info = json.loads((out / "run.json").read_text())
    assert info["intervals"]["level"] == 0.9 and info["intervals"]["resamples"] == 999
    off = run(validate_spec({**data, "statistics": {"confidence": None}}),
              out_dir=Path(tmp_path / "off"), progress=False).out_dir
    assert "ci_low" not in pd.read_csv(off / "summary.csv").columns
    assert json.loads((off / "run.json").read_text())["intervals"] is None
