"""Tests of the ``spearman`` metric plugin: values, properties, registration, engine use.

The generic properties come from ``mapsim.testing.MetricContract`` (last class below); the
tests before it check the values against scipy and what is special about ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from mapsim.engine.moments import compute_moments
from mapsim.plugins.metrics.pearson import Pearson
from mapsim.registry import Provider, build_registry
from mapsim.engine.similarity import MapStack, map_similarity, stack_maps
from mapsim.testing import MetricContract

import mapsim_spearman
from mapsim_spearman import Spearman


def random_maps(rng: np.random.Generator, n: int, p: int = 400) -> torch.Tensor:
    """Maps with distinct pixel values (no ties)."""
    return torch.from_numpy(rng.standard_normal((n, p)).astype(np.float32))


def relu_maps(rng: np.random.Generator, n: int, p: int = 400) -> torch.Tensor:
    """Rectified, partly correlated maps: many exact zeros, so many tied ranks."""
    shared = rng.standard_normal((3, p))
    maps = rng.standard_normal((n, 3)) @ shared + 0.5 * rng.standard_normal((n, p))
    return torch.from_numpy(np.maximum(maps - 0.3, 0.0).astype(np.float32))


def reference(x: torch.Tensor, y: torch.Tensor, absolute: bool) -> np.ndarray:
    """scipy.stats.spearmanr, pair by pair, in float64."""
    out = np.empty((x.shape[0], y.shape[0]))
    for i, a in enumerate(x.double().numpy()):
        for j, b in enumerate(y.double().numpy()):
            out[i, j] = stats.spearmanr(a, b).statistic
    return np.abs(out) if absolute else out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


@pytest.mark.parametrize("make", [random_maps, relu_maps])
@pytest.mark.parametrize("absolute", [True, False])
def test_agrees_with_scipy(rng, make, absolute):
    x, y = make(rng, 6), make(rng, 5)
    if make is relu_maps:
        assert (x == 0).float().mean() > 0.3  # the tie rule is really exercised
    got = Spearman(Spearman.Params(absolute=absolute)).from_maps(x, y)
    assert got.dtype == torch.float64 and got.shape == (6, 5)
    np.testing.assert_allclose(got.numpy(), reference(x, y, absolute), rtol=0, atol=1e-6)


def test_symmetric_and_self_similarity_one(rng):
    x, y = relu_maps(rng, 5), relu_maps(rng, 4)
    metric = Spearman(Spearman.Params(absolute=False))
    torch.testing.assert_close(metric.from_maps(x, y), metric.from_maps(y, x).T)
    np.testing.assert_allclose(torch.diagonal(metric.from_maps(x, x)).numpy(), 1.0, atol=1e-12)


def test_invariant_under_increasing_transform_unlike_pearson(rng):
    x, y = relu_maps(rng, 4), relu_maps(rng, 3)
    warped = torch.exp(3 * x)  # strictly increasing: same ranks, different values
    spearman, pearson = Spearman(), Pearson()
    torch.testing.assert_close(spearman.from_maps(warped, y), spearman.from_maps(x, y))
    assert not torch.allclose(pearson.from_maps(warped, y), pearson.from_maps(x, y), atol=1e-3)


def test_constant_map_is_nan(rng):
    x = relu_maps(rng, 3)
    x[1] = 0.0  # a dead ReLU map
    x[2] = 0.7
    values = Spearman().from_maps(x, relu_maps(rng, 2))
    assert torch.isnan(values[1:]).all()
    assert not torch.isnan(values[0]).any()


def test_info_follows_absolute():
    assert Spearman().info.value_range == (0.0, 1.0)
    assert Spearman(Spearman.Params(absolute=False)).info.value_range == (-1.0, 1.0)
    assert Spearman().uses_moments is False
    assert "monotonic" in Spearman().info.invariances


def test_hook_registers_the_metric():
    provider = Provider("mapsim-spearman", "0.1.0", "spearman")
    registry = build_registry([(mapsim_spearman, provider)])
    entry = registry.get("metric", "spearman")
    assert entry.cls is Spearman and entry.provider == provider
    assert registry.create("metric", "spearman", {"absolute": False}).params.absolute is False


def test_engine_flags_constant_maps_as_dead(rng):
    """Through mapsim's engine: NaN only where the engine's dead() says a map is dead."""
    maps = relu_maps(rng, 4, p=20 * 20).reshape(4, 20, 20)
    maps[2] = 0.0
    stack: MapStack = stack_maps({"a": {"L1": maps}}, ["a"])
    sim = map_similarity(Spearman(), stack, compute_moments(stack.z), "a", "a")
    assert sim.dead_a.tolist() == [False, False, True, False]
    assert np.isnan(sim.values[2]).all() and np.isnan(sim.values[:, 2]).all()
    live = [0, 1, 3]
    np.testing.assert_allclose(sim.values[np.ix_(live, live)],
                               reference(stack.z[live], stack.z[live], True), atol=1e-6)


class TestSpearmanContract(MetricContract):
    """mapsim's contract: symmetry, self-similarity 1, range, the declared invariances
    (scale, shift, monotonic, sign) and NaN only for dead maps, for both settings."""

    @pytest.fixture(params=[True, False], ids=["absolute", "signed"])
    def metric(self, request):
        return Spearman(Spearman.Params(absolute=request.param))
