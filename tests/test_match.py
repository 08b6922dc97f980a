"""The ``match`` aggregator: optimal one-to-one matching against brute force on small matrices,
ranks against the best partners of ``max``, and its across-image summary against numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

import mapsim
from mapsim import Block, SimilarityMatrix
from mapsim.registry import load_registry

REGISTRY = load_registry()


def _sim(values, layers_a, layers_b, model_a="A", model_b="B", high=True, dead_a=None,
         dead_b=None):
    """A similarity matrix with layers given as [(name, n_maps), ...]."""
    def blocks(model, layers):
        out, start = [], 0
        for name, n in layers:
            out.append(Block(model, name, start, start + n, (4, 4)))
            start += n
        return out

    values = np.asarray(values, dtype=float)
    return SimilarityMatrix(
        "m", model_a, model_b, values, blocks(model_a, layers_a), blocks(model_b, layers_b),
        np.zeros(values.shape[0], bool) if dead_a is None else np.asarray(dead_a),
        np.zeros(values.shape[1], bool) if dead_b is None else np.asarray(dead_b), high)


def _brute_force(block: np.ndarray, high: bool) -> tuple[int, float, dict[int, int]]:
    """The most allowed (non-NaN) pairs, then the best sum, over every injective pairing."""
    n_a, n_b = block.shape
    best = None
    if n_a <= n_b:
        pairings = (list(enumerate(p)) for p in itertools.permutations(range(n_b), n_a))
    else:
        pairings = ([(i, j) for j, i in enumerate(p)]
                    for p in itertools.permutations(range(n_a), n_b))
    for pairs in pairings:
        ok = [(i, j) for i, j in pairs if not np.isnan(block[i, j])]
        total = sum(block[i, j] for i, j in ok)
        key = (len(ok), total if high else -total)
        if best is None or key > best[0]:
            best = (key, dict(ok))
    (count, score), pairs = best
    return count, score if high else -score, pairs


def _aggregate(sim):
    agg = REGISTRY.create("aggregator", "match", {})
    tables = agg.aggregate(sim, {})
    return tables["match"], tables["match_layers"]


@pytest.mark.parametrize("shape", [(5, 5), (4, 6), (6, 4)])
@pytest.mark.parametrize("high", [True, False])
def test_the_matching_is_the_brute_force_optimum(shape, high):
    rng = np.random.default_rng(sum(shape) + high)
    values = rng.uniform(0, 2, shape)
    per_map, per_layer = _aggregate(_sim(values, [("a", shape[0])], [("b", shape[1])],
                                         high=high))
    count, total, pairs = _brute_force(values, high)
    matched = per_map.dropna(subset=["map_b"])
    assert len(matched) == count == min(shape)
    assert dict(zip(matched["map_a"], matched["map_b"].astype(int))) == pairs
    assert matched["value"].sum() == pytest.approx(total, abs=1e-12)
    assert matched["map_b"].is_unique  # one to one
    assert per_layer["n_matched"].item() == count
    assert per_layer["matched_mean"].item() == pytest.approx(total / count, abs=1e-12)
    assert per_layer["matched_std"].item() == pytest.approx(
        np.std(matched["value"], ddof=1), abs=1e-12)


def test_dead_maps_and_self_pairs_are_never_matched():
    rng = np.random.default_rng(3)
    values = rng.uniform(0, 1, (5, 5))
    values = (values + values.T) / 2
    values[2, :] = values[:, 2] = np.nan  # map 2 is dead
    dead = np.arange(5) == 2
    sim = _sim(values, [("L", 5)], [("L", 5)], model_a="A", model_b="A", dead_a=dead,
               dead_b=dead)
    per_map, per_layer = _aggregate(sim)
    block = values.copy()
    np.fill_diagonal(block, np.nan)
    count, total, pairs = _brute_force(block, True)
    matched = per_map.dropna(subset=["map_b"])
    assert count == 4 and dict(zip(matched["map_a"], matched["map_b"].astype(int))) == pairs
    assert (matched["map_a"] != matched["map_b"]).all()
    row = per_map[per_map["map_a"] == 2].iloc[0]
    assert pd.isna(row["map_b"]) and np.isnan(row["value"]) and pd.isna(row["rank"])
    assert bool(row["dead_a"])
    assert per_layer["n_maps"].item() == 5 and per_layer["n_matched"].item() == 4


def test_ranks_count_the_better_partners_and_rank_one_is_the_max_partner():
    rng = np.random.default_rng(4)
    values = rng.uniform(0, 1, (6, 10))
    sim = _sim(values, [("a1", 3), ("a2", 3)], [("b1", 4), ("b2", 6)])
    per_map, per_layer = _aggregate(sim)
    best = mapsim.best_partners(sim)
    merged = per_map.merge(best, on=["layer_a", "map_a", "layer_b"], suffixes=("", "_max"))
    assert len(merged) == 6 * 2
    for row in merged.itertuples():
        cols = slice(0, 4) if row.layer_b == "b1" else slice(4, 10)
        others = values[(0 if row.layer_a == "a1" else 3) + row.map_a, cols]
        assert row.rank == 1 + int((others > row.value).sum())
        assert (row.rank == 1) == (row.map_b == row.map_b_max)
    expected = merged.groupby(["layer_a", "layer_b"], sort=False).apply(
        lambda g: 100.0 * (g["rank"] == 1).mean(), include_groups=False)
    np.testing.assert_allclose(per_layer["pct_best"], expected.to_numpy())


def test_match_layers_is_summarised_across_images(tmp_path):
    spec = {
        "name": "match",
        "models": {"n": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 1}},
        "layers": {"n": ["blocks.0", "blocks.1"]},
        "images": {"name": "synthetic-vessels", "count": 3, "size": [24, 24], "seed": 2},
        "comparisons": [["n", "n"]],
        "metrics": ["pearson"],
        "aggregators": ["max", "match"],
    }
    result = mapsim.run(spec, out=tmp_path / "r", progress=False, base_dir=tmp_path)
    per_image = pd.read_csv(result.dir / "match_layers.csv")
    summary = pd.read_csv(result.dir / "match_layers_summary.csv")
    assert per_image["image"].nunique() == 3
    for (la, lb), group in per_image.groupby(["layer_a", "layer_b"]):
        row = summary[(summary.layer_a == la) & (summary.layer_b == lb)
                      & (summary.statistic == "matched_mean")].iloc[0]
        values = group["matched_mean"].dropna()
        assert row["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert row["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        assert row["n_images"] == len(values)
    per_map = pd.read_csv(result.dir / "match.csv")
    assert list(per_map.columns) == ["image", "metric", "model_a", "layer_a", "map_a",
                                     "model_b", "layer_b", "map_b", "value", "rank", "dead_a",
                                     "dead_b"]
