"""The contract of mapsim.testing, run over every registered metric and each of its examples.

New metric plugins (built-in or installed) are picked up from the registry, so they are
tested without editing this file.
"""

from __future__ import annotations

import pytest

from mapsim.core.plugins import load_registry
from mapsim.testing import MetricContract

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
