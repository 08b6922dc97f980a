"""The per-pair re-implementation in benchmarks/perpair.py agrees with mapsim's engine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import relu_like_maps

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_perpair():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("perpair_bench", BENCH / "perpair.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_per_pair_values_and_zero_flags_agree_with_the_engine(rng):
    bench = load_perpair()
    maps = {f"L{k}": torch.from_numpy(relu_like_maps(rng, 6, 12, 10)) for k in (1, 2, 4)}
    maps["L2"][1] = 0.0  # dead maps: one pair with both dead, many with one dead
    maps["L4"][3] = 0.0
    labels = list(maps)
    pairs = [(la, i, lb, j) for la in labels for i in range(6) for lb in labels for j in range(6)]
    slow = bench.per_pair(maps, pairs)
    fast = bench.engine(maps)
    assert len(slow) == len(fast) == 18 * 18  # one row per ordered pair
    key = ["layer_a", "map_a", "layer_b", "map_b"]
    merged = slow.merge(fast, on=key, suffixes=("_pair", "_engine"))
    assert len(merged) == len(slow)
    np.testing.assert_allclose(merged["value_pair"], merged["value_engine"].astype(float),
                               atol=1e-5)
    assert (merged["dead_a_pair"] == merged["dead_a_engine"].astype(bool)).all()
    assert (merged["dead_b_pair"] == merged["dead_b_engine"].astype(bool)).all()
    both = merged[(merged.layer_a == "L2") & (merged.map_a == 1)
                  & (merged.layer_b == "L4") & (merged.map_b == 3)]
    assert both["value_pair"].item() == 1.0 and both["value_engine"].item() == 1.0
    one = merged[(merged.layer_a == "L2") & (merged.map_a == 1) & (merged.layer_b == "L1")]
    assert (one["value_pair"] == 0.0).all() and (one["value_engine"] == 0.0).all()
    # and both against the float64 reference of the benchmark
    ref = bench.reference(maps)
    offsets = {"L1": 0, "L2": 6, "L4": 12}
    rows = slow["layer_a"].map(offsets) + slow["map_a"]
    cols = slow["layer_b"].map(offsets) + slow["map_b"]
    np.testing.assert_allclose(slow["value"], ref[rows, cols], atol=1e-5)
