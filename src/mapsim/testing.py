"""Contract tests for metric plugins: run them in your own test suite (needs pytest).

Subclass :class:`MetricContract` in a test module and provide a ``metric`` fixture::

    import pytest
    from mapsim.testing import MetricContract
    from my_plugin import MyMetric

    class TestMyMetric(MetricContract):
        @pytest.fixture(params=[{}, {"absolute": False}])
        def metric(self, request):
            return MyMetric(MyMetric.Params(**request.param))

pytest then runs every ``test_*`` method below against each metric. They check what the
metric's :class:`mapsim.MetricInfo` promises, on seeded random and ReLU-like inputs:

* symmetry (value(x, y) equals value(y, x), transposed for map granularity);
* self-similarity: a map (or layer) compared with itself gets the best value of the declared
  range (the upper bound for a similarity, the lower bound for a distance);
* every defined value lies inside ``value_range``;
* each declared invariance (names in :data:`TRANSFORMS`) leaves the values unchanged;
* a moment-based metric's :meth:`~mapsim.Metric.from_moments` agrees with its generic
  :meth:`~mapsim.Metric.from_maps` to 1e-5, and (layer granularity) its
  :meth:`~mapsim.Metric.layers_from_moments` agrees with :meth:`~mapsim.Metric.from_moments`
  per layer pair;
* undefined values are explicit: NaN only where :meth:`~mapsim.Metric.dead` flags a map (map
  granularity), :class:`mapsim.Undefined` rather than a bare NaN (layer granularity).

A metric with ``accumulates = True`` is exercised through ``update`` / ``finish`` with each
sample image given to ``update`` in turn; other metrics get the first image's maps flattened.
Add invariance names of your own by extending ``transforms`` in your subclass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

try:
    import pytest
except ImportError as exc:  # pragma: no cover
    raise ImportError("mapsim.testing needs pytest: pip install pytest") from exc

from mapsim.engine.moments import compute_moments
from mapsim.api import Metric, MetricPathError, Undefined

#: images, maps of x, maps of y, height, width of the generated samples
SHAPE = (8, 5, 4, 9, 9)
#: tolerance of every comparison (values are float64 from float32 maps)
TOLERANCE = 1e-5

Transform = Callable[[np.ndarray, np.random.Generator, str], np.ndarray]


def _per_map(maps: np.ndarray, values: np.ndarray) -> np.ndarray:
    return values[None, :, None, None] * np.ones_like(maps)


def _scale(maps: np.ndarray, rng: np.random.Generator, granularity: str) -> np.ndarray:
    """Positive factors: one per map (map granularity) or one for the layer (isotropic)."""
    n = maps.shape[1] if granularity == "map" else 1
    return maps * _per_map(maps, np.repeat(rng.uniform(0.5, 3.0, n), maps.shape[1] // n))


def _shift(maps: np.ndarray, rng: np.random.Generator, granularity: str) -> np.ndarray:
    """A constant added to each map (the same constant in every image)."""
    return maps + _per_map(maps, rng.uniform(-2.0, 2.0, maps.shape[1]))


def _sign(maps: np.ndarray, rng: np.random.Generator, granularity: str) -> np.ndarray:
    """Negation: of some maps (map granularity) or of the whole layer."""
    if granularity != "map":
        return -maps
    signs = np.where(np.arange(maps.shape[1]) % 2 == 0, -1.0, 1.0)
    return maps * _per_map(maps, signs)


def _orthogonal(maps: np.ndarray, rng: np.random.Generator, granularity: str) -> np.ndarray:
    """A random orthogonal mix of a layer's maps (the same in every image)."""
    q, r = np.linalg.qr(rng.standard_normal((maps.shape[1], maps.shape[1])))
    q = q * np.sign(np.diag(r))
    return np.einsum("ij,njhw->nihw", q, maps)


def _monotonic(maps: np.ndarray, rng: np.random.Generator, granularity: str) -> np.ndarray:
    """A strictly increasing function of every value (x^3 + x keeps zeros at zero)."""
    return maps**3 + maps


#: invariance name -> transform of a (images, maps, height, width) array
TRANSFORMS: dict[str, Transform] = {
    "scale": _scale,
    "shift": _shift,
    "sign": _sign,
    "orthogonal": _orthogonal,
    "monotonic": _monotonic,
}


def random_maps(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian maps (images, maps, height, width), float64."""
    return rng.standard_normal(shape)


def relu_maps(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth, partly correlated, rectified maps, like conv layers after a ReLU."""
    images, n_maps, height, width = shape
    base = rng.standard_normal((images, 3, height, width))
    for axis in (2, 3):
        base = (base + np.roll(base, 1, axis=axis) + np.roll(base, -1, axis=axis)) / 3
    mix = rng.standard_normal((n_maps, 3))
    maps = np.einsum("ck,nkhw->nchw", mix, base) + 0.3 * rng.standard_normal(shape)
    return np.maximum(maps - 0.1, 0.0)


def fresh(metric: Metric) -> Metric:
    """A new instance with the same parameters and label (accumulating metrics keep state)."""
    copy = type(metric)(metric.params)
    copy.label = metric.label
    return copy


def evaluate(metric: Metric, x: np.ndarray, y: np.ndarray, path: str = "maps") -> Any:
    """The metric between x and y, each (images, maps, height, width).

    Map granularity: a (C_x, C_y) float64 numpy array. Layer granularity: a float or an
    :class:`~mapsim.Undefined`. ``path`` is ``maps`` (generic) or ``moments``; accumulating
    metrics always go through ``update`` / ``finish``.
    """
    if metric.accumulates:
        metric = fresh(metric)
        for index in range(x.shape[0]):
            maps = {"x": {"x": torch.from_numpy(x[index]).float()},
                    "y": {"y": torch.from_numpy(y[index]).float()}}
            metric.update(f"image-{index}", maps)
        return metric.finish("x", "y")[("x", "y")]
    xf = torch.from_numpy(x[0].reshape(x.shape[1], -1)).float()
    yf = torch.from_numpy(y[0].reshape(y.shape[1], -1)).float()
    if path == "moments":
        z = torch.cat([xf, yf])
        layers = [(0, len(xf)), (len(xf), len(z))] if metric.needs_layer_norms else None
        moments = compute_moments(z, layers=layers)
        value = metric.from_moments(moments, slice(0, len(xf)), slice(len(xf), len(z)))
    else:
        value = metric.from_maps(xf, yf)
    if metric.info.granularity == "map":
        return torch.as_tensor(value).to(torch.float64).cpu().numpy()
    return value if isinstance(value, Undefined) else float(value)


def _best(metric: Metric) -> float:
    low, high = metric.info.value_range
    return high if metric.info.higher_is_more_similar else low


def _require(condition: bool, message: str = "contract not met") -> None:
    """Fail the contract test with ``message`` (an AssertionError, kept under ``python -O``)."""
    if not condition:
        raise AssertionError(message)


def _close(a: Any, b: Any, what: str, atol: float = TOLERANCE) -> None:
    if isinstance(a, Undefined) or isinstance(b, Undefined):
        _require(isinstance(a, Undefined) and isinstance(b, Undefined), f"{what}: {a!r} vs {b!r}")
        return
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float),
                               rtol=TOLERANCE, atol=atol, err_msg=what)


def _defined(value: Any) -> np.ndarray:
    if isinstance(value, Undefined):
        return np.array([])
    values = np.asarray(value, dtype=float).ravel()
    return values[~np.isnan(values)]


class MetricContract:
    """pytest contract tests for a :class:`mapsim.Metric`: subclass, give a ``metric`` fixture."""

    #: invariance name -> transform; extend in a subclass for invariances of your own
    transforms: dict[str, Transform] = TRANSFORMS
    #: (images, maps of x, maps of y, height, width) of the generated inputs
    shape: tuple[int, int, int, int, int] = SHAPE

    @pytest.fixture
    def metric(self) -> Metric:
        """Override: the metric instance under test."""
        pytest.fail("subclass MetricContract and define a `metric` fixture")

    @pytest.fixture(params=["random", "relu"])
    def inputs(self, request) -> tuple[np.ndarray, np.ndarray]:
        """Two seeded sets of maps, x and y, of shape (images, maps, height, width)."""
        images, cx, cy, height, width = self.shape
        make = random_maps if request.param == "random" else relu_maps
        rng = np.random.default_rng(20190509)
        return make(rng, (images, cx, height, width)), make(rng, (images, cy, height, width))

    def test_info_is_well_formed(self, metric):
        info = metric.info
        _require(info.granularity in ("map", "layer"), info.granularity)
        low, high = info.value_range
        _require(low < high, f"value_range {info.value_range} is empty")
        _require(isinstance(info.higher_is_more_similar, bool),
                 "higher_is_more_similar must be a bool")
        _require(
            not (metric.accumulates and info.granularity != "layer"),
            "a metric that accumulates over images must have layer granularity",
        )
        unknown = set(info.invariances) - set(self.transforms)
        _require(
            not unknown,
            f"invariances {sorted(unknown)} have no transform; known: {sorted(self.transforms)}"
            " (extend `transforms` in your contract subclass)",
        )
        described = metric.describe()
        _require(
            described["name"] == metric.name and described["granularity"] == info.granularity,
            f"describe() disagrees with the metric: {described}",
        )

    def test_symmetry(self, metric, inputs):
        if not metric.info.symmetric:
            pytest.skip("the metric declares symmetric=False")
        x, y = inputs
        forward, backward = evaluate(metric, x, y), evaluate(metric, y, x)
        if metric.info.granularity == "map":
            backward = backward.T
        _close(forward, backward, "value(x, y) != value(y, x)")

    def test_self_similarity_is_the_best_value(self, metric, inputs):
        x, _ = inputs
        value = evaluate(metric, x, x)
        if metric.info.granularity == "map":
            value = np.diagonal(value)
            value = value[~np.isnan(value)]
            _require(value.size, "every map of the input is undefined")
        _require(not isinstance(value, Undefined), f"value(x, x) is undefined: {value}")
        _close(value, np.full(np.shape(value), _best(metric)), "value(x, x)", atol=1e-6)

    def test_values_lie_in_the_declared_range(self, metric, inputs):
        x, y = inputs
        low, high = metric.info.value_range
        values = _defined(evaluate(metric, x, y))
        _require(values.size, "no defined value on live inputs")
        slack = 1e-9 * max(1.0, float(np.abs(values).max()))
        _require(
            values.min() >= low - slack and values.max() <= high + slack,
            f"values in [{values.min()}, {values.max()}] outside {metric.info.value_range}",
        )

    def test_declared_invariances_hold(self, metric, inputs):
        if not metric.info.invariances:
            pytest.skip("the metric declares no invariance")
        x, y = inputs
        base = evaluate(metric, x, y)
        for name in metric.info.invariances:
            rng = np.random.default_rng(7)
            moved = self.transforms[name](x, rng, metric.info.granularity)
            _close(evaluate(metric, moved, y), base, f"not invariant to {name!r} (on x)")
            moved = self.transforms[name](y, rng, metric.info.granularity)
            _close(evaluate(metric, x, moved), base, f"not invariant to {name!r} (on y)")

    def test_moments_path_agrees_with_the_generic_path(self, metric, inputs):
        if metric.accumulates or not metric.uses_moments:
            pytest.skip("the metric has no moments path")
        x, y = inputs
        try:
            generic = evaluate(metric, x, y, "maps")
        except MetricPathError:
            pytest.fail("a moment-based metric should implement from_maps too: the contract "
                        "checks the moments path against it")
        _close(evaluate(metric, x, y, "moments"), generic, "from_moments != from_maps")

    def test_all_layer_pairs_at_once_agree_with_each_pair(self, metric, inputs):
        if (metric.accumulates or not metric.uses_moments
                or metric.info.granularity != "layer"):
            pytest.skip("only for layer metrics with a moments path")
        x, y = inputs
        xf = torch.from_numpy(x[0].reshape(x.shape[1], -1)).float()
        yf = torch.from_numpy(y[0].reshape(y.shape[1], -1)).float()
        dead = torch.zeros_like(xf[:1])  # a constant layer: undefined values too
        z = torch.cat([xf, yf, dead])
        layers = [(0, len(xf)), (len(xf), len(xf) + len(yf)), (len(z) - 1, len(z))]
        moments = compute_moments(z, layers=layers if metric.needs_layer_norms else None)
        slices = [slice(a, b) for a, b in layers]
        table = metric.layers_from_moments(moments, slices, slices[::-1])
        _require(len(table) == 3 and all(len(line) == 3 for line in table),
                 f"layers_from_moments gave a table of the wrong shape: {table}")
        for i, rows in enumerate(slices):
            for j, cols in enumerate(slices[::-1]):
                _close(table[i][j], metric.from_moments(moments, rows, cols),
                       "layers_from_moments != from_moments")

    def test_blocks_give_the_values_of_one_pass(self, metric, inputs):
        """A blockwise metric: the images taken in blocks (each block's state handed over by
        block_state() and taken in by a fresh instance with add_block_state(), as a run in
        several processes or a resumed run does) give the values of one pass of update()."""
        if not (metric.accumulates and metric.blockwise):
            pytest.skip("only for metrics that accumulate over images in blocks")
        x, y = inputs
        whole = evaluate(metric, x, y)
        for cuts in ([1], [2, 3], list(range(1, x.shape[0]))):
            collector, merged = fresh(metric), fresh(metric)
            collector.start_blocks()
            bounds = [0, *[c for c in cuts if c < x.shape[0]], x.shape[0]]
            for start, stop in zip(bounds, bounds[1:]):
                for index in range(start, stop):
                    collector.update(f"image-{index}",
                                     {"x": {"x": torch.from_numpy(x[index]).float()},
                                      "y": {"y": torch.from_numpy(y[index]).float()}})
                meta, arrays = collector.block_state()
                json.dumps(meta)  # it is stored as JSON
                _require(all(isinstance(a, np.ndarray) for a in arrays.values()),
                         "block_state() must give numpy arrays")
                merged.add_block_state(meta, arrays)
            _close(merged.finish("x", "y")[("x", "y")], whole,
                   f"blocks cut at {cuts} differ from one pass")

    def test_undefined_values_are_explicit(self, metric, inputs):
        x, y = inputs
        x = x.copy()
        x[:, 0] = 0.0  # a dead (all-zero) map
        if metric.info.granularity == "layer":
            for value in (evaluate(metric, x, y), evaluate(metric, np.zeros_like(x), y)):
                _require(
                    isinstance(value, Undefined) or math.isfinite(value),
                    f"a layer metric returned {value!r}: give a number or mapsim.Undefined",
                )
                if isinstance(value, Undefined):
                    _require(value.reason, "Undefined needs a reason")
            return
        values = evaluate(metric, x, y)
        xf = torch.from_numpy(x[0].reshape(x.shape[1], -1)).float()
        yf = torch.from_numpy(y[0].reshape(y.shape[1], -1)).float()
        moments = compute_moments(torch.cat([xf, yf]))
        dead = metric.dead(moments, 1e-10).cpu().numpy()
        allowed = dead[: len(xf), None] | dead[None, len(xf):]
        unexplained = np.isnan(values) & ~allowed
        _require(not unexplained.any(), "NaN for a pair of maps that dead() calls live")
