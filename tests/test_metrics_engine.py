"""The metric plugins inside the engine: distances in the aggregators, several metrics in one
run from one moments computation per image and group, and layer_similarity.csv."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cdist

from conftest import relu_like_maps
from mapsim.engine import step as step_module
from mapsim.errors import SpecError
from mapsim.engine.moments import compute_moments
from mapsim.registry import load_registry
from mapsim.runner.run import Runner, run
from mapsim.engine.similarity import map_similarity, stack_maps
from mapsim.spec.run_spec import load_spec, validate_spec
from mapsim.plugins.aggregators import MaxAggregator, ThresholdAggregator, ThresholdParams
from mapsim.plugins.metrics.euclidean import Euclidean, EuclideanParams
from test_runner import reference_maps

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def _euclidean_sim(rng):
    maps = torch.from_numpy(relu_like_maps(rng, 10, 16, 16))
    stack = stack_maps({"m": {"L1": maps[:6], "L2": maps[6:]}}, ["m"])
    metric = Euclidean(EuclideanParams(rms=True))
    return stack, map_similarity(metric, stack, compute_moments(stack.z), "m", "m")


def test_euclidean_best_partners_are_minima_and_threshold_keeps_smaller(rng):
    stack, sim = _euclidean_sim(rng)
    z = stack.z.double().numpy()
    distances = cdist(z, z) / math.sqrt(z.shape[1])
    best = MaxAggregator().aggregate(sim, {})
    limit = float(np.median(best["max"]["value"]))
    table = ThresholdAggregator(ThresholdParams(per_metric={"euclidean": limit})).aggregate(
        sim, best)["max"]
    blocks = {"L1": range(0, 6), "L2": range(6, 10)}
    for row in table.itertuples():
        own = blocks[row.layer_a][row.map_a]
        candidates = {j: distances[own, blocks[row.layer_b][j]]
                      for j in range(len(blocks[row.layer_b]))
                      if not (row.layer_a == row.layer_b and j == row.map_a)}
        assert row.map_b == min(candidates, key=candidates.get)
        assert row.value == pytest.approx(min(candidates.values()), abs=1e-5)
        assert row.threshold == limit
        assert row.well_correlated == (row.value <= limit)
    assert 0 < table["well_correlated"].sum() < len(table)


def _metric(name, **params):
    metric = load_registry().create("metric", name, params)
    return metric


def test_threshold_refuses_a_distance_without_its_own_threshold():
    pearson, euclid = _metric("pearson"), _metric("euclidean")
    with pytest.raises(SpecError, match="'euclidean' is a distance .* per_metric"):
        ThresholdAggregator().prepare([pearson, euclid])
    with pytest.raises(SpecError, match="'euclidean' is a distance"):  # value is for similarities
        ThresholdAggregator(ThresholdParams(value=2.0)).prepare([euclid])
    ThresholdAggregator(ThresholdParams(per_metric={"euclidean": 2.0})).prepare([pearson, euclid])
    ThresholdAggregator().prepare([pearson, _metric("cka")])  # layer metrics have no threshold
    with pytest.raises(SpecError, match="'euclidian' is not a metric label .* Closest: euclidean"):
        ThresholdAggregator(ThresholdParams(per_metric={"euclidian": 2.0})).prepare(
            [pearson, euclid])


def _spec(**overrides):
    data = {
        "name": "multi",
        "models": {
            "a": {"architecture": {"name": "fcn", "depth": 3, "width": 5}, "seed": 1},
            "b": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 2},
        },
        "layers": {"a": ["blocks.0", "blocks.2"], "b": ["blocks.0", "blocks.1"]},
        "images": {"name": "files", "paths": [str(DATA / f"vessels-{i}.png") for i in (1, 2, 3)]},
        "comparisons": [["a", "a"], ["a", "b"]],
        "metrics": [
            "pearson", "cosine", {"name": "euclidean", "rms": True},
            {"name": "cka", "label": "cka-linear"},
            {"name": "cka", "label": "cka-debiased", "debiased": True},
            {"name": "cka", "label": "cka-images", "samples": "images", "pool": "avg", "size": 4},
        ],
        "aggregators": ["max", {"name": "threshold", "per_metric": {"euclidean": 0.5}}, "pivot"],
        "engine": {"pooled": True},
        "device": "cpu",
    }
    data.update(overrides)
    return validate_spec(data)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    calls = []
    original = step_module.compute_moments

    def counting(z, **kwargs):
        calls.append((tuple(z.shape), kwargs.get("layers")))
        return original(z, **kwargs)

    step_module.compute_moments = counting
    try:
        out = run(_spec(), out_dir=tmp_path_factory.mktemp("multi") / "out", progress=False)
    finally:
        step_module.compute_moments = original
    return out.out_dir, calls


def test_all_moment_metrics_share_one_moments_computation_per_image_and_group(multi):
    _, calls = multi
    assert len(calls) == 3  # 3 images x 1 comparison group (a and b are linked)
    assert all(layers is not None for _, layers in calls)  # debiased CKA asked for norms


def test_multi_metric_tables(multi):
    out, _ = multi
    best = pd.read_csv(out / "max.csv")
    assert set(best.metric) == {"pearson", "cosine", "euclidean"}
    euclid = best[best.metric == "euclidean"]
    assert (euclid.threshold == 0.5).all()
    assert (euclid.well_correlated == (euclid.value <= 0.5)).all()
    # cosine against scipy for one layer pair of one image
    maps = reference_maps(1, 3, 5, ["blocks.0", "blocks.2"], DATA / "vessels-2.png")
    row = best[(best.metric == "cosine") & (best.image == "vessels-2") & (best.model_b == "a")
               & (best.layer_a == "blocks.0") & (best.layer_b == "blocks.2")
               & (best.map_a == 1)].iloc[0]
    cos = np.abs(1 - cdist(maps[0][1:2], maps[1], "cosine"))[0]
    assert row.value == pytest.approx(np.nanmax(cos), abs=1e-5)


def test_layer_similarity_per_image_pooled_across_images_and_summary(multi):
    out, _ = multi
    table = pd.read_csv(out / "layer_similarity.csv", keep_default_na=False,
                        na_values=[""])
    assert list(table.columns) == ["image", "metric", "model_a", "layer_a", "model_b",
                                   "layer_b", "value", "reason", "p"]
    per_image = table[table.image != "all-images"]
    assert set(per_image.metric) == {"cka-linear", "cka-debiased"}
    assert set(per_image.image) == {"vessels-1", "vessels-2", "vessels-3"}
    # 2 x 2 layer pairs for (a, a) and for (a, b), per image and metric
    assert len(per_image) == 3 * 2 * 8
    across = table[table.image == "all-images"]
    assert set(across.metric) == {"cka-images"} and len(across) == 8
    # images as samples with 3 images: too few for the unbiased estimator, said so
    assert across.value.isna().all()
    assert (across.reason == "too few samples: n=3 < 4 for the unbiased HSIC estimator").all()

    maps = reference_maps(1, 3, 5, ["blocks.0", "blocks.2"], DATA / "vessels-1.png")
    row = per_image[(per_image.image == "vessels-1") & (per_image.metric == "cka-linear")
                    & (per_image.model_b == "a") & (per_image.layer_a == "blocks.0")
                    & (per_image.layer_b == "blocks.2")].iloc[0]
    x, y = maps[0].T - maps[0].T.mean(0), maps[1].T - maps[1].T.mean(0)
    # feature-space form (the pixel Gram matrices would be 16384 x 16384)
    expected = np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert row.value == pytest.approx(expected, abs=1e-5)

    pooled = pd.read_csv(out / "pooled" / "layer_similarity.csv")
    assert set(pooled.metric) == {"cka-linear", "cka-debiased"} and len(pooled) == 16
    summary = pd.read_csv(out / "layer_similarity_summary.csv")
    sel = summary[(summary.metric == "cka-linear") & (summary.model_b == "a")
                  & (summary.layer_a == "blocks.0") & (summary.layer_b == "blocks.2")].iloc[0]
    values = per_image[(per_image.metric == "cka-linear") & (per_image.model_b == "a")
                       & (per_image.layer_a == "blocks.0") & (per_image.layer_b == "blocks.2")]
    assert sel["mean"] == pytest.approx(values.value.mean())
    assert sel["std"] == pytest.approx(values.value.std(ddof=1))
    assert sel["n_images"] == 3
    info = json.loads((out / "run.json").read_text())
    assert info["pooled"]["left_out"] == ["cka-images"]


def test_pooled_debiased_cka_uses_every_pixel_of_every_image(multi):
    out, _ = multi
    pooled = pd.read_csv(out / "pooled" / "layer_similarity.csv")
    maps = [reference_maps(1, 3, 5, ["blocks.0", "blocks.2"], DATA / f"vessels-{i}.png")
            for i in (1, 2, 3)]
    x = np.concatenate([m[0] for m in maps], axis=1).T
    y = np.concatenate([m[1] for m in maps], axis=1).T
    row = pooled[(pooled.metric == "cka-debiased") & (pooled.model_b == "a")
                 & (pooled.layer_a == "blocks.0") & (pooled.layer_b == "blocks.2")].iloc[0]
    # the pixel Gram matrices are too big here; the feature-space form is exact too
    xc, yc = x - x.mean(0), y - y.mean(0)
    n = len(xc)
    na, nb = (xc**2).sum(1), (yc**2).sum(1)

    def h(a, b, sa, sb):
        return (np.linalg.norm(a.T @ b) ** 2 - n / (n - 2) * sa @ sb
                + sa.sum() * sb.sum() / ((n - 1) * (n - 2)))

    expected = h(xc, yc, na, nb) / math.sqrt(h(xc, xc, na, na) * h(yc, yc, nb, nb))
    assert row.value == pytest.approx(expected, abs=1e-5)


def test_images_as_samples_with_enough_images(tmp_path):
    paths = [str(DATA / f"vessels-{i}.png") for i in (1, 2, 3)] * 2  # 6 samples
    spec = _spec(
        images={"name": "files", "paths": [str(tmp_path / f"img{i}.png") for i in range(6)]},
        metrics=[{"name": "cka", "samples": "images", "pool": "avg", "size": 4,
                  "batch_size": 4}],
        aggregators=["max"], comparisons=[["a", "b"]], engine={"pooled": False},
    )
    import shutil
    for i, p in enumerate(paths):
        shutil.copy(p, tmp_path / f"img{i}.png")
    out = run(spec, out_dir=tmp_path / "out", progress=False).out_dir
    table = pd.read_csv(out / "layer_similarity.csv")
    assert set(table.image) == {"all-images"} and len(table) == 4
    assert table.value.notna().all() and table.value.between(-1, 1).all()
    assert not (out / "layer_similarity_summary.csv").exists()


def test_cka_images_refuses_a_roi(tmp_path):
    spec = _spec(
        images={"name": "files", "paths": str(DATA / "vessels-1.png"),
                "labels": str(DATA / "labels")},
        metrics=[{"name": "cka", "samples": "images"}], aggregators=["max"],
        engine={"roi": {"dilate": 1}},
    )
    with pytest.raises(SpecError, match="cannot be combined with engine.roi"):
        run(spec, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_distance_without_threshold_fails_before_any_image(tmp_path):
    spec = _spec(metrics=["pearson", "euclidean"], aggregators=["max", "threshold"])
    with pytest.raises(SpecError, match="'euclidean' is a distance"):
        Runner(spec, tmp_path)


def test_example_metrics_spec_validates():
    import jsonschema
    import yaml

    from mapsim.spec.run_spec import json_schema

    jsonschema.validate(yaml.safe_load((ROOT / "examples" / "metrics.yaml").read_text()),
                        json_schema())
    spec = load_spec(ROOT / "examples" / "metrics.yaml")
    Runner(spec, ROOT / "examples")  # metrics and aggregators agree (thresholds for distances)


def test_the_original_dead_rule_concerns_map_metrics_only(tmp_path):
    engine = {"dead_maps": "original"}
    Runner(_spec(metrics=["pearson", "cosine", "cka"], aggregators=["max"], engine=engine),
           tmp_path)
    with pytest.raises(SpecError, match="not defined for metric 'euclidean'"):
        Runner(_spec(metrics=["euclidean"], aggregators=["max"], engine=engine), tmp_path)


@pytest.mark.parametrize("name", ["pearson", "cosine", "euclidean"])
@pytest.mark.parametrize("policy", ["exclude", "original"])
def test_values_prepared_ahead_equal_the_checked_values(rng, name, policy):
    # the GPU fast path applies the dead-map rule and the NaN check where the moments are
    from mapsim.engine.similarity import prepared_values

    metric = _metric(name, **({"standardise": True} if name == "euclidean" else {}))
    if policy == "original" and metric.dead_fill is None:
        pytest.skip("the metric has no original dead-map rule")
    maps = torch.from_numpy(relu_like_maps(rng, 12, 16, 16))
    maps[3] = 0.0  # dead for every metric here
    maps[9] = 0.0
    stack = stack_maps({"m": {"L1": maps[:7], "L2": maps[7:]}}, ["m"])
    moments = compute_moments(stack.z)
    dead = metric.dead(moments, 1e-10)
    assert bool(dead[3]) and bool(dead[9])
    values, undefined = prepared_values(metric, stack, moments, "m", "m", dead, policy)
    assert not bool(undefined)
    fast = map_similarity(metric, stack, moments, "m", "m", dead_policy=policy, values=values,
                          dead=dead, undefined=undefined)
    plain = map_similarity(metric, stack, moments, "m", "m", dead_policy=policy)
    np.testing.assert_array_equal(fast.values, plain.values)
    np.testing.assert_array_equal(fast.dead_a, plain.dead_a)
    if policy == "original":
        assert fast.values[3, 9] == metric.dead_fill[0] and fast.values[3, 0] == metric.dead_fill[1]
    else:
        assert np.isnan(fast.values[3]).all() and np.isnan(fast.values[:, 9]).all()


def test_a_nan_for_live_maps_found_ahead_is_reported_with_the_pair(rng):
    from mapsim.errors import MapsimError
    from mapsim.engine.similarity import prepared_values

    metric = _metric("pearson")
    stack = stack_maps({"m": {"L1": torch.from_numpy(relu_like_maps(rng, 5, 8, 8))}}, ["m"])
    moments = compute_moments(stack.z)
    dead = metric.dead(moments, 1e-10)
    original = metric.from_moments

    def broken(m, rows, cols):
        out = original(m, rows, cols)
        out[1, 2] = torch.nan
        return out

    metric.from_moments = broken
    values, undefined = prepared_values(metric, stack, moments, "m", "m", dead)
    assert bool(undefined)
    with pytest.raises(MapsimError, match="live maps m map 1 and m map 2"):
        map_similarity(metric, stack, moments, "m", "m", values=values, dead=dead,
                       undefined=undefined)
