"""max / min / threshold / pivot / summary against independent brute-force recomputation."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
import torch

from mapsim.tables import aggregation
from mapsim.engine.similarity import Block, SimilarityMatrix, apply_dead_policy
from mapsim.plugins.aggregators import (
    MaxAggregator,
    PivotAggregator,
    ThresholdAggregator,
    ThresholdParams,
)


def make_sim(rng, sizes_a, sizes_b, same_model, dead_a=(), dead_b=(), higher=True):
    ca, cb = sum(sizes_a), sum(sizes_b)
    values = rng.uniform(0, 1, (ca, cb))
    if same_model:
        values = (values + values.T) / 2
    da = np.zeros(ca, bool)
    db = np.zeros(cb, bool)
    da[list(dead_a)] = True
    db[list(dead_b)] = True
    values = apply_dead_policy(torch.from_numpy(values), torch.from_numpy(da),
                               torch.from_numpy(db), "exclude", None).numpy()

    def blocks(model, sizes):
        out, row = [], 0
        for k, n in enumerate(sizes):
            out.append(Block(model, f"L{k + 1}", row, row + n, (8, 8)))
            row += n
        return out

    mb = "a" if same_model else "b"
    return SimilarityMatrix("pearson", "a", mb, values, blocks("a", sizes_a), blocks(mb, sizes_b),
                            da, db, higher)


def brute_force_partners(sim, best=True):
    """Independent reference: plain Python loops over every map and partner."""
    want_high = sim.higher_is_more_similar == best
    rows = []
    for ba in sim.blocks_a:
        for bb in sim.blocks_b:
            for i in range(ba.n_maps):
                chosen, chosen_j = None, None
                for j in range(bb.n_maps):
                    if sim.same_model and ba.layer == bb.layer and i == j:
                        continue
                    v = sim.values[ba.start + i, bb.start + j]
                    if math.isnan(v):
                        continue
                    if chosen is None or (v > chosen if want_high else v < chosen):
                        chosen, chosen_j = v, j
                rows.append((ba.layer, i, bb.layer, chosen_j, chosen))
    return rows


@pytest.mark.parametrize("same_model", [True, False])
@pytest.mark.parametrize("best", [True, False])
@pytest.mark.parametrize("higher", [True, False])
def test_partners_match_brute_force(rng, same_model, best, higher):
    sizes = [5, 7] if same_model else [6, 4]
    sim = make_sim(rng, [5, 7], sizes, same_model, dead_a=[2, 9],
                   dead_b=[2, 9] if same_model else [3], higher=higher)
    table = aggregation.partners(sim, best=best)
    expected = brute_force_partners(sim, best)
    assert len(table) == len(expected)
    for (_, row), (la, i, lb, j, v) in zip(table.iterrows(), expected):
        assert (row.layer_a, row.map_a, row.layer_b) == (la, i, lb)
        if v is None:
            assert pd.isna(row.map_b) and math.isnan(row.value)
        else:
            assert row.map_b == j and row.value == v


def test_a_map_is_never_its_own_partner_within_one_layer(rng):
    sim = make_sim(rng, [4], [4], True)
    sim.values[:] = 0.1
    np.fill_diagonal(sim.values, 1.0)  # self-similarity must be ignored
    table = aggregation.partners(sim)
    assert (table["map_a"] != table["map_b"]).all()
    assert (table["value"] == 0.1).all()


def test_distance_best_partner_is_the_minimum(rng):
    sim = make_sim(rng, [3], [3], False, higher=False)
    sim.values[:] = np.array([[5.0, 1.0, 9.0], [2.0, 8.0, 0.5], [7.0, 7.0, 3.0]])
    table = aggregation.partners(sim)
    assert table["map_b"].tolist() == [1, 2, 2]
    assert table["value"].tolist() == [1.0, 0.5, 3.0]
    thresholded = ThresholdAggregator(ThresholdParams(value=1.0)).aggregate(sim, {"max": table})
    assert thresholded["max"]["well_correlated"].tolist() == [True, True, False]


def test_inter_comparison_keeps_both_directions(rng):
    sim = make_sim(rng, [3], [5], False)
    forward = aggregation.partners(sim)
    backward = aggregation.partners(sim.transposed())
    assert len(forward) == 3 and len(backward) == 5
    assert set(backward["model_a"]) == {"b"}
    for _, row in backward.iterrows():
        assert row.value == sim.values[:, row.map_a].max()


def test_pivot_reproduces_the_thesis_worked_example():
    """Table 3 of the thesis: 31 of 64 maps pass 0.8 -> 48.4375 % of the layer's maps."""
    rng = np.random.default_rng(3)
    well = rng.uniform(0.8, 1.0, 31)
    weak = rng.uniform(0.2, 0.79, 31)
    values = np.concatenate([well, weak, [np.nan, np.nan]])  # two dead maps
    best = pd.DataFrame({
        "metric": "pearson", "model_a": "cnn2", "layer_a": "conv_module1", "map_a": range(64),
        "model_b": "cnn2", "layer_b": "conv_module1", "value": values,
        "dead_a": [False] * 62 + [True, True],
    })
    best["threshold"] = 0.8
    row = aggregation.pivot(best, 0.8, True).iloc[0]
    assert row.n_maps == 64 and row.n_dead == 2 and row.n_live == 62
    assert row.n_well == 31
    assert row.pct_well == pytest.approx(48.4375)
    assert row.well_mean == pytest.approx(statistics.mean(well))
    assert row.well_median == pytest.approx(statistics.median(well))
    assert row.well_std == pytest.approx(statistics.stdev(well))
    live = values[:62]
    assert row.best_mean == pytest.approx(statistics.mean(live))
    assert row.best_std == pytest.approx(statistics.stdev(live))


def test_pivot_with_no_passing_map_reports_zero_and_empty_stats():
    best = pd.DataFrame({
        "metric": "pearson", "model_a": "m", "layer_a": "l", "map_a": [0, 1],
        "model_b": "m", "layer_b": "l", "value": [0.1, 0.2], "dead_a": [False, False],
    })
    row = aggregation.pivot(best, 0.8, True).iloc[0]
    assert row.n_well == 0 and row.pct_well == 0.0
    assert math.isnan(row.well_mean) and math.isnan(row.well_std)


def test_aggregator_chain_produces_study_tables(rng):
    sim = make_sim(rng, [4, 4], [4, 4], True)
    tables = {}
    for agg in (MaxAggregator(), ThresholdAggregator(ThresholdParams(value=0.5)),
                PivotAggregator()):
        tables.update(agg.aggregate(sim, tables))
    assert set(tables) == {"max", "pivot"}
    assert len(tables["pivot"]) == 4  # 2 x 2 layer pairs
    for _, prow in tables["pivot"].iterrows():
        part = tables["max"][(tables["max"].layer_a == prow.layer_a)
                             & (tables["max"].layer_b == prow.layer_b)]
        assert prow.n_well == int((part["value"] >= 0.5).sum())
        assert prow.n_well == int(part["well_correlated"].sum())


def test_summary_accumulator_matches_pandas(rng):
    frames = []
    acc = aggregation.SummaryAccumulator(["layer"])
    for image in range(5):
        frame = pd.DataFrame({"layer": ["x", "y"], "stat": rng.uniform(size=2),
                              "maybe": [rng.uniform(), np.nan if image % 2 else rng.uniform()]})
        acc.add(frame)
        frames.append(frame)
    table = acc.table().set_index(["layer", "statistic"])
    everything = pd.concat(frames)
    for (layer, stat), row in table.iterrows():
        values = everything.loc[everything.layer == layer, stat].dropna()
        assert row["mean"] == pytest.approx(values.mean())
        assert row["std"] == pytest.approx(values.std(ddof=1))
        assert row["n_images"] == len(values)


def test_summary_std_is_empty_for_a_single_image():
    acc = aggregation.SummaryAccumulator(["k"])
    acc.add(pd.DataFrame({"k": ["a"], "v": [0.5]}))
    row = acc.table().iloc[0]
    assert row["mean"] == 0.5 and math.isnan(row["std"]) and row["n_images"] == 1


def test_original_dead_rule_fills_one_and_zero():
    values = torch.full((3, 3), 0.5, dtype=torch.float64)
    dead = torch.tensor([True, False, True])
    filled = apply_dead_policy(values, dead, dead, "original", (1.0, 0.0)).numpy()
    assert filled[0, 2] == 1.0 and filled[0, 0] == 1.0
    assert filled[0, 1] == 0.0 and filled[1, 2] == 0.0
    assert filled[1, 1] == 0.5


def test_pairs_table_has_every_pair(rng):
    sim = make_sim(rng, [2, 3], [2, 3], True, dead_a=[1], dead_b=[1])
    table = aggregation.pairs_table(sim)
    assert len(table) == 25
    row = table[(table.layer_a == "L2") & (table.map_a == 2) & (table.layer_b == "L1")
                & (table.map_b == 0)].iloc[0]
    assert row.value == sim.values[4, 0]
    assert table[table.dead_a].shape[0] == 5



@pytest.mark.parametrize("sizes", [(4, 4, 4), (3, 5, 4)])
def test_partners_equal_sized_and_ragged_layers_match_a_per_map_loop(sizes):
    """Both code paths of partners() (one argmax over equal-sized layers, or one pass per
    layer) against a plain loop over maps, with ties, dead maps and the self-pair rule."""
    rng = np.random.default_rng(3)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    blocks = [Block("m", f"l{k}", int(starts[k]), int(starts[k + 1]), (2, 2))
              for k in range(len(sizes))]
    n = int(starts[-1])
    values = np.round(rng.random((n, n)), 1)  # ties: the first best map wins
    dead = np.zeros(n, dtype=bool)
    dead[[1, 6]] = True
    values[dead, :] = np.nan
    values[:, dead] = np.nan
    sim = SimilarityMatrix("r", "m", "m", values, blocks, blocks, dead, dead)
    for best in (True, False):
        table = aggregation.partners(sim, best=best)
        expected = []
        for ba in blocks:
            for bb in blocks:
                for i in range(ba.n_maps):
                    row = values[ba.start + i, bb.start:bb.stop].copy()
                    if ba.layer == bb.layer:
                        row[i] = np.nan
                    if np.isnan(row).all():
                        expected.append((None, math.nan))
                        continue
                    j = int(np.nanargmax(row) if best else np.nanargmin(row))
                    expected.append((j, row[j]))
        assert [None if pd.isna(v) else int(v) for v in table["map_b"]] == [e[0] for e in expected]
        np.testing.assert_array_equal(table["value"].to_numpy(), [e[1] for e in expected])


def _boundary_sim(metric, row_best, higher):
    """One map per row of A whose best partner in B is exactly ``row_best[i]`` (the other
    partners are clearly worse), two models so there is no self-pair rule."""
    n = len(row_best)
    worse = 0.1 if higher else 9.0
    values = np.full((n, 3), worse)
    values[:, 1] = row_best
    blocks_a = [Block("a", "L1", 0, n, (2, 2))]
    blocks_b = [Block("b", "L1", 0, 3, (2, 2))]
    return SimilarityMatrix(metric, "a", "b", values, blocks_a, blocks_b,
                            np.zeros(n, bool), np.zeros(3, bool), higher)


def _chain(sim, params):
    tables = {}
    for agg in (MaxAggregator(), ThresholdAggregator(params), PivotAggregator()):
        tables.update(agg.aggregate(sim, tables))
    return tables


def test_a_best_value_exactly_at_the_similarity_threshold_is_well_correlated():
    """The study keeps the maps whose maximum |r| >= 0.8: a value exactly at 0.8 counts
    (``>=``, not ``>``), through the real max -> threshold -> pivot chain."""
    just_below = np.nextafter(0.8, 0.0)
    just_above = np.nextafter(0.8, 1.0)
    sim = _boundary_sim("pearson", [0.8, 0.8, just_below, just_above, 0.5], higher=True)
    tables = _chain(sim, ThresholdParams(value=0.8))
    best = tables["max"]
    assert best["value"].tolist()[:2] == [0.8, 0.8]  # exactly on the threshold
    assert best["well_correlated"].tolist() == [True, True, False, True, False]
    row = tables["pivot"].iloc[0]
    assert row.threshold == 0.8
    assert row.n_well == 3 and row.pct_well == pytest.approx(60.0)
    assert row.well_mean == pytest.approx((0.8 + 0.8 + just_above) / 3)
    assert row.well_median == 0.8


def test_a_best_value_exactly_at_the_distance_threshold_is_well_correlated():
    """For a distance (lower is more similar) a best distance exactly at the maximum counts
    (``<=``, not ``<``), through max -> threshold (per_metric) -> pivot."""
    just_below = np.nextafter(1.5, 0.0)
    just_above = np.nextafter(1.5, 2.0)
    sim = _boundary_sim("euclidean", [1.5, just_above, just_below, 1.5, 3.0], higher=False)
    tables = _chain(sim, ThresholdParams(per_metric={"euclidean": 1.5}))
    best = tables["max"]
    assert best["value"].tolist()[0] == 1.5 and best["value"].tolist()[3] == 1.5
    assert (best["threshold"] == 1.5).all()
    assert best["well_correlated"].tolist() == [True, False, True, True, False]
    row = tables["pivot"].iloc[0]
    assert row.threshold == 1.5
    assert row.n_well == 3 and row.pct_well == pytest.approx(60.0)
    assert row.well_median == 1.5


def _threshold_for(info, per_metric=None):
    """The threshold the `threshold` aggregator resolves for a metric with ``info``."""
    import mapsim
    from mapsim.registry import load_registry

    class Custom(mapsim.MapMetric):
        name = "custom"

        def from_maps(self, x, y):
            return x.double() @ y.double().T

    metric = Custom()
    metric.info = info
    aggregator = load_registry().create("aggregator", "threshold",
                                        {"per_metric": per_metric or {}})
    aggregator.prepare([metric])
    return aggregator._thresholds["custom"]


def test_a_new_metric_gets_the_threshold_that_fits_its_scale():
    import mapsim
    from mapsim.errors import SpecError

    assert _threshold_for(mapsim.MetricInfo(value_range=(0.0, 1.0))) == 0.8
    assert _threshold_for(mapsim.MetricInfo(value_range=(-1.0, 1.0))) == 0.8
    assert _threshold_for(mapsim.MetricInfo(value_range=(0.0, 5.0),
                                            default_threshold=3.0)) == 3.0
    assert _threshold_for(mapsim.MetricInfo(value_range=(0.0, 5.0)), {"custom": 2.5}) == 2.5
    with pytest.raises(SpecError, match=r"takes values in \[0, inf\].*per_metric"):
        _threshold_for(mapsim.MetricInfo(value_range=(0.0, float("inf"))))
    with pytest.raises(SpecError, match="is a distance"):
        _threshold_for(mapsim.MetricInfo(higher_is_more_similar=False,
                                         value_range=(0.0, float("inf"))))
