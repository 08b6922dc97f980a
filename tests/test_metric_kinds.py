"""The three metric kinds a plugin author picks from (MapMetric, LayerMetric, ImagesMetric),
the deprecated 0.1 ``Metric`` with flags, and a third-party ImagesMetric run end to end in
blocks, with resume, against a float64 numpy reference."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mapsim
from mapsim.registry import Provider, build_registry, discover
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec
from mapsim.testing import MetricContract

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


# --------------------------------------------------------------------------- map and layer kinds
class SquaredCorrelation(mapsim.MapMetric):
    """r^2 between maps, from the moments and from the maps (a toy written only against
    mapsim's public names)."""

    name = "r-squared"
    info = mapsim.MetricInfo(invariances=("scale", "shift", "sign"))

    def from_moments(self, moments, rows, cols):
        g = moments.comoment
        d = torch.diagonal(g)
        return g[rows, cols] ** 2 / torch.outer(d[rows], d[cols])

    def from_maps(self, x, y):
        x, y = x.double(), y.double()
        xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        return (xc @ yc.T) ** 2 / torch.outer((xc * xc).sum(1), (yc * yc).sum(1))


class OnlyMaps(mapsim.MapMetric):
    name = "only-maps"

    def from_maps(self, x, y):
        return torch.ones(x.shape[0], y.shape[0], dtype=torch.float64)


def test_a_map_metric_uses_the_moments_exactly_when_it_implements_from_moments():
    assert SquaredCorrelation().uses_moments is True
    assert OnlyMaps().uses_moments is False
    assert SquaredCorrelation.info.granularity == OnlyMaps.info.granularity == "map"
    assert not SquaredCorrelation().accumulates


def test_a_metric_kind_without_any_path_is_refused():
    class Nothing(mapsim.MapMetric):
        name = "nothing"

    with pytest.raises(TypeError, match="neither from_moments nor from_maps"):
        Nothing()


def test_a_layer_metric_has_layer_granularity_whatever_its_info_says():
    class Trace(mapsim.LayerMetric):
        name = "trace"
        info = mapsim.MetricInfo(granularity="map")  # corrected by the kind

        def from_maps(self, x, y):
            return float(x.double().var() + y.double().var())

    assert Trace.info.granularity == "layer" and Trace().uses_moments is False


def test_the_new_kinds_raise_no_deprecation_but_a_plain_metric_does():
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Fine(mapsim.MapMetric):
            name = "fine"

            def from_maps(self, x, y):
                return x.double() @ y.double().T

    with pytest.warns(DeprecationWarning, match="subclass mapsim.MapMetric"):
        class Old(mapsim.Metric):
            name = "old"
            uses_moments = False

            def from_maps(self, x, y):
                return x.double() @ y.double().T


class TestSquaredCorrelationContract(MetricContract):
    @pytest.fixture
    def metric(self):
        return SquaredCorrelation()


# --------------------------------------------------------------------------- images kind
class MeanMapCorrelation(mapsim.ImagesMetric):
    """Across images: each map's spatial mean is one feature per image; the value of a layer
    pair is, over the maps of layer a, the mean of each map's best |r| (across images) with a
    map of layer b. Maps whose mean never changes are left out."""

    name = "mean-map-r"
    info = mapsim.MetricInfo(symmetric=False, invariances=("scale", "shift"))

    def __init__(self, params=None):
        super().__init__(params)
        self.add_state("means", "cat")
        self.add_state("images", "sum")

    def update(self, image_id, maps, mask=None):
        self.means.append({f"{model}/{layer}": m.double().mean(dim=(1, 2)).numpy()
                           for model, layers in maps.items() for layer, m in layers.items()})
        self.images = self.images + 1.0

    def compute(self, model_a, model_b):
        keys = list(self.means[0])
        stacked = {k: np.stack([entry[k] for entry in self.means]) for k in keys}
        out = {}
        for ka in keys:
            for kb in keys:
                if ka.split("/")[0] != model_a or kb.split("/")[0] != model_b:
                    continue
                if self.images < 3:
                    out[(ka.split("/", 1)[1], kb.split("/", 1)[1])] = mapsim.Undefined(
                        f"too few images: {int(self.images)}")
                    continue
                out[(ka.split("/", 1)[1], kb.split("/", 1)[1])] = _mean_best_r(stacked[ka],
                                                                             stacked[kb])
        return out


def _mean_best_r(a: np.ndarray, b: np.ndarray) -> float | mapsim.Undefined:
    """Mean over the columns of a of their best |r| with a column of b (varying ones only)."""
    a, b = a[:, a.std(axis=0) > 0], b[:, b.std(axis=0) > 0]
    if not a.shape[1] or not b.shape[1]:
        return mapsim.Undefined("zero variance: no map's mean changes across images")
    r = np.corrcoef(a.T, b.T)[: a.shape[1], a.shape[1]:]
    return float(np.abs(r).max(axis=1).mean())


class TestImagesMetricContract(MetricContract):
    @pytest.fixture
    def metric(self):
        return MeanMapCorrelation()


def test_an_images_metric_state_round_trips_through_blocks():
    metric = MeanMapCorrelation()
    metric.start_blocks()
    rng = np.random.default_rng(0)
    for i in range(3):
        metric.update(f"i{i}", {"a": {"L": torch.from_numpy(rng.random((4, 5, 5)))}})
    meta, arrays = metric.block_state()
    assert metric.means == [] and float(metric.images) == 0.0  # taken out, starts afresh
    assert set(arrays) == {"means/a/L", "images"} and arrays["means/a/L"].shape == (3, 4)
    other = MeanMapCorrelation()
    other.add_block_state(meta, arrays)
    assert float(other.images) == 3.0 and len(other.means) == 3


def _registry():
    plugin = types.SimpleNamespace(
        register_metrics=mapsim.hookimpl(lambda register: register(MeanMapCorrelation)))
    return build_registry([*discover(), (plugin, Provider("test-plugin", "1.0", "t"))])


def _spec(registry, block_images):
    return validate_spec({
        "name": "kinds",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 3}},
        "layers": {"a": {"L1": "blocks.0", "L2": "blocks.1"}},
        "images": {"name": "synthetic-vessels", "count": 5, "size": [40, 48], "seed": 3},
        "comparisons": [["a", "a"]],
        "metrics": ["pearson", "mean-map-r"],
        "engine": {"block_images": block_images},
    }, registry=registry)


def test_a_third_party_images_metric_runs_in_blocks_and_matches_numpy(tmp_path):
    """Blocks of 2 images (3 blocks) give the value of one block of 5 and of float64 numpy
    over the maps extracted independently (hooks on a model built from the same seed)."""
    registry = _registry()
    values = {}
    for block_images in (2, 16):
        out = run(_spec(registry, block_images), out_dir=tmp_path / f"b{block_images}",
                  progress=False, registry=registry).out_dir
        table = pd.read_csv(out / "layer_similarity.csv")
        rows = table[table.metric == "mean-map-r"]
        assert set(rows.image) == {"all-images"} and len(rows) == 4
        values[block_images] = rows.set_index(["layer_a", "layer_b"]).value
    pd.testing.assert_series_equal(values[2], values[16], rtol=0, atol=1e-12)

    from mapsim.models.build import build_model
    from mapsim.plugins.vessels import SyntheticVessels

    architecture = registry.create("architecture", "fcn", {"depth": 2, "width": 4})
    model = build_model("a", architecture=architecture, seed=3).module.eval()
    dataset = SyntheticVessels(SyntheticVessels.Params(count=5, size=(40, 48), seed=3))
    means = {"blocks.0": [], "blocks.1": []}
    captured = {}
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda mod, inp, out, p=p: captured.__setitem__(p, out.detach())) for p in means]
    with torch.no_grad():
        for item in dataset:
            model(torch.from_numpy(item.image)[None])
            for p in means:
                means[p].append(captured[p][0].double().mean(dim=(1, 2)).numpy())
    for hook in hooks:
        hook.remove()
    a, b = np.stack(means["blocks.0"]), np.stack(means["blocks.1"])
    assert a.std(axis=0).min() > 0 and b.std(axis=0).min() > 0  # every map's mean varies
    r = np.corrcoef(a.T, b.T)[: a.shape[1], a.shape[1]:]
    assert values[2][("L1", "L2")] == pytest.approx(np.abs(r).max(axis=1).mean(), abs=1e-6)
