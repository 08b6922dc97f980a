"""The contract of mapsim.testing, run over every registered metric and each of its examples.

New metric plugins (built-in or installed) are picked up from the registry, so they are
tested without editing this file. The last tests show that the contract fails for metrics
that break what they declare.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mapsim
from mapsim.plugins.metrics.pearson import Pearson
from mapsim.registry import load_registry
from mapsim.plugins.metrics.euclidean import Euclidean
from mapsim.testing import MetricContract, random_maps, relu_maps

REGISTRY = load_registry()
CASES = [(entry.name, params) for entry in REGISTRY.entries("metric")
         for params in entry.cls.examples]


def _case_id(case) -> str:
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


class TestEveryRegisteredMetric(MetricContract):
    @pytest.fixture(params=CASES, ids=[_case_id(c) for c in CASES])
    def metric(self, request):
        name, params = request.param
        return REGISTRY.create("metric", name, params)


def test_every_builtin_metric_is_covered():
    names = {name for name, _ in CASES}
    assert {"pearson", "cosine", "euclidean", "cka"} <= names


# --------------------------------------------------------------------------- the contract fails


def _inputs():
    rng = np.random.default_rng(1)
    return random_maps(rng, (8, 5, 9, 9)), relu_maps(rng, (8, 4, 9, 9))


class _Lopsided(Pearson):
    """Pearson with a bug: the moments path weights the first map of y."""

    name = "lopsided"

    def from_moments(self, moments, rows, cols):
        values = super().from_moments(moments, rows, cols)
        values[:, 0] *= 0.9
        return values


class _NaNLayer(mapsim.Metric):
    name = "nan-layer"
    uses_moments = False
    info = mapsim.MetricInfo(granularity="layer")

    def from_maps(self, x, y):
        return 1.0 if bool(x.any()) else float("nan")


@pytest.mark.parametrize("check, metric", [
    # a distance declaring a scale invariance it does not have
    ("test_declared_invariances_hold", lambda: _with_info(
        Euclidean(), mapsim.MetricInfo("map", False, True, (0.0, math.inf), ("scale",)))),
    # a range that the values leave
    ("test_values_lie_in_the_declared_range", lambda: _with_info(
        Pearson(), mapsim.MetricInfo("map", True, True, (0.0, 0.1), ()))),
    # a similarity declared as a distance: self-similarity is then the wrong end
    ("test_self_similarity_is_the_best_value", lambda: _with_info(
        Pearson(), mapsim.MetricInfo("map", False, True, (0.0, 1.0), ()))),
    ("test_moments_path_agrees_with_the_generic_path", _Lopsided),
    ("test_undefined_values_are_explicit", _NaNLayer),
])
def test_the_contract_catches_broken_metrics(check, metric):
    with pytest.raises(AssertionError):
        getattr(MetricContract(), check)(metric(), _inputs())


def test_the_contract_catches_an_asymmetric_metric():
    class Asymmetric(Pearson):
        name = "asymmetric"

        def from_maps(self, x, y):
            return super().from_maps(x, y) * (1 + 0.01 * torch.arange(y.shape[0]))

    with pytest.raises(AssertionError, match="value\\(x, y\\) != value\\(y, x\\)"):
        MetricContract().test_symmetry(Asymmetric(), _inputs())


def _with_info(metric, info):
    metric.info = info
    return metric
