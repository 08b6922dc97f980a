"""Minibatch CKA with images as samples (``cka``, ``samples: images``): against an independent
float64 numpy minibatch CKA, whatever the blocks, processes and resumes; memory bounded by one
batch; a run's values against maps taken with plain forward hooks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mapsim.plugins.metrics import hsic
from mapsim.plugins.metrics.cka import CKA, CKAParams
from mapsim.plugins.metrics.cka_images import batch_bounds


# --------------------------------------------------------------------------- the reference
def reference_batches(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive batches of ``size``; a last remainder of fewer than 4 joins the batch
    before it (worked out here by hand, independently of batch_bounds)."""
    if n < 4:
        return []
    cuts = list(range(0, n, size)) + [n]
    batches = list(zip(cuts, cuts[1:]))
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] < 4:
        (lo, _), (_, hi) = batches[-2], batches[-1]
        batches[-2:] = [(lo, hi)]
    return batches


def _unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al.'s unbiased HSIC, written out term by term in float64."""
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones = np.ones(n)
    return float((np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3)))


def _kernel(x: np.ndarray, kind: str, bandwidth: float = 0.5) -> np.ndarray:
    if kind == "linear":
        return x @ x.T
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * bandwidth**2 * np.median(d2)))


def reference_cka(xs: np.ndarray, ys: np.ndarray, size: int, kind: str = "linear") -> float:
    """Minibatch CKA (Nguyen et al. 2021): sums of the batches' unbiased HSIC, weighted by
    their number of images, then CKA; features flattened whole."""
    fx = xs.reshape(len(xs), -1).astype(np.float64)
    fy = ys.reshape(len(ys), -1).astype(np.float64)
    sums = np.zeros((2, 2))
    for lo, hi in reference_batches(len(xs), size):
        k, l = _kernel(fx[lo:hi], kind), _kernel(fy[lo:hi], kind)
        sums += (hi - lo) * np.array([[_unbiased(k, k), _unbiased(k, l)],
                                      [_unbiased(l, k), _unbiased(l, l)]])
    return sums[0, 1] / math.sqrt(sums[0, 0] * sums[1, 1])


def _maps(rng, n: int, shift: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Related activations with a large mean (as ReLU outputs have), float32 values."""
    xs = rng.standard_normal((n, 3, 4, 5)) + shift
    ys = np.concatenate([xs[:, :2] * 2 - 1, rng.standard_normal((n, 2, 4, 5))], axis=1) ** 2
    return xs.astype(np.float32).astype(np.float64), ys.astype(np.float32).astype(np.float64)


def _image(xs, ys, i):
    return {"a": {"x": torch.from_numpy(xs[i]).float()},
            "b": {"y": torch.from_numpy(ys[i]).float()}}


def _metric(**params):
    return CKA.create(CKAParams(samples="images", pool="none", **params))


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("size", [4, 5, 7])
def test_batch_bounds_match_the_hand_worked_batches(size):
    for n in range(0, 40):
        expected = reference_batches(n, size)
        got = sorted({batch_bounds(i, n, size) for i in range(n)} - {None})
        assert got == expected, (n, size)


def test_one_pass_equals_the_float64_reference(rng):
    for n in (4, 5, 9, 10, 13, 14, 23):
        xs, ys = _maps(rng, n)
        for kind in ("linear", "rbf"):
            metric = _metric(batch_size=5, kernel=kind)
            for i in range(n):
                metric.update(f"i{i}", _image(xs, ys, i))
            value = metric.finish("a", "b")[("x", "y")]
            assert value == pytest.approx(reference_cka(xs, ys, 5, kind), abs=1e-9), (n, kind)


def _in_blocks(xs, ys, cuts, ranks, size, tell_places=True, **params):
    """The images in blocks cut at ``cuts``, the blocks shared by ``ranks`` processes (one
    metric each, as assign_blocks does: contiguous runs), the block states json/numpy
    round-tripped and merged in image order by a fresh metric, as a run does."""
    n = len(xs)
    bounds = [0, *cuts, n]
    blocks = list(zip(bounds, bounds[1:]))
    per_rank = np.array_split(np.arange(len(blocks)), ranks)
    states = {}
    for share in per_rank:
        metric = _metric(batch_size=size, **params)
        metric.start_blocks()
        for b in share:
            lo, hi = blocks[b]
            if tell_places:
                metric.start_block(lo, n)
            for i in range(lo, hi):
                metric.update(f"i{i}", _image(xs, ys, i))
            meta, arrays = metric.block_state()
            states[b] = (json.loads(json.dumps(meta)), {k: np.array(v) for k, v in arrays.items()})
    merged = _metric(batch_size=size, **params)
    for b in range(len(blocks)):
        merged.add_block_state(*states[b])
    return merged.finish("a", "b")[("x", "y")], states


@pytest.mark.parametrize("cuts,ranks", [([], 1), ([3], 1), ([3], 2), ([5, 10], 3),
                                        ([1, 2, 7, 8, 12], 2), ([4, 9, 12], 4)])
def test_blocks_and_processes_give_the_values_of_one_pass(rng, cuts, ranks):
    xs, ys = _maps(rng, 14)
    expected = reference_cka(xs, ys, 5)
    value, _ = _in_blocks(xs, ys, cuts, ranks, 5)
    assert value == pytest.approx(expected, abs=1e-9)
    if ranks == 1:  # one collector without places (update() numbering): the same batches
        value, _ = _in_blocks(xs, ys, cuts, 1, 5, tell_places=False)
        assert value == pytest.approx(expected, abs=1e-9)


def test_aligned_blocks_hand_over_sums_not_features(rng):
    """Blocks of a multiple of the batch size carry no image's features (only where the last
    batch takes a remainder), so the state does not grow with the images."""
    sizes = []
    for n in (20, 80):
        xs, ys = _maps(rng, n)
        value, states = _in_blocks(xs, ys, list(range(10, n, 10)), 2, 5)
        assert value == pytest.approx(reference_cka(xs, ys, 5), abs=1e-9)
        for meta, arrays in states.values():
            assert meta["edges"]["entries"] == 0
            assert all(not k.startswith("firsts/") or v.size == 0 for k, v in arrays.items())
        sizes.append(max(sum(v.nbytes for v in arrays.values())
                         for _, arrays in states.values()))
    assert sizes[0] == sizes[1]
    # 22 images in blocks of 10, batches of 5: the last batch (15-21) is cut by a block end
    xs, ys = _maps(rng, 22)
    value, states = _in_blocks(xs, ys, [10, 20], 3, 5)
    assert value == pytest.approx(reference_cka(xs, ys, 5), abs=1e-9)
    assert [states[b][0]["edges"]["entries"] for b in range(3)] == [0, 5, 2]


def test_memory_is_one_batch_and_maps_are_not_copied(rng):
    metric = _metric(batch_size=5)
    xs, ys = _maps(rng, 60)
    held = []
    for i in range(60):
        image = _image(xs, ys, i)
        metric.update(f"i{i}", image)
        held.append(len(metric._buffer))
        if metric._buffer and metric._buffer[-1][0] == i:  # kept as given: no copy
            assert metric._buffer[-1][1][0].data_ptr() == image["a"]["x"].data_ptr()
    assert max(held) <= 5 + 3
    assert len(metric.edges) == 0 and np.asarray(metric.hsic).shape == (2, 2)
    assert metric.finish("a", "b")[("x", "y")] == pytest.approx(
        reference_cka(xs, ys, 5), abs=1e-9)


def test_chunked_gram_equals_the_whole_product(rng):
    rows = [torch.from_numpy(rng.standard_normal(1000) + 50).float() for _ in range(6)]
    x = torch.stack(rows).double().numpy()
    x -= x.mean(0)
    uncentred = float((torch.stack(rows).double() ** 2).sum(1).max())  # ~ 1000 x 50^2
    for chunk in (6, 60, 601, 10**6):
        gram, constant = hsic.batch_gram(rows, chunk_elements=chunk)
        # centred after the float64 sums: error ~ eps x the uncentred entries
        np.testing.assert_allclose(gram.numpy(), x @ x.T, rtol=0, atol=1e-14 * uncentred)
        assert not constant
    gram, constant = hsic.batch_gram([rows[0]] * 4, chunk_elements=100)
    assert constant


def test_products_split_into_pieces_equal_the_whole_product(rng):
    """The GPU's way of multiplying (a batch of short pieces, hsic._split_products), forced
    on the CPU: the same float64 Gram matrix, with whole pieces, a partial last piece and
    chunks shorter than a piece."""
    length = 2 * hsic.PIECE + 1234
    rows = [torch.from_numpy(rng.standard_normal(length) + 3).float() for _ in range(5)]
    x = torch.stack(rows).double().numpy()
    x -= x.mean(0)
    scale = float((torch.stack(rows).double() ** 2).sum(1).max())
    for chunk in (5 * 1000, 5 * hsic.PIECE, 5 * length):
        gram, constant = hsic.batch_gram(rows, chunk_elements=chunk, split_products=True)
        np.testing.assert_allclose(gram.numpy(), x @ x.T, rtol=0, atol=1e-14 * scale)
        plain, _ = hsic.batch_gram(rows, chunk_elements=chunk, split_products=False)
        np.testing.assert_allclose(gram.numpy(), plain.numpy(), rtol=0, atol=1e-14 * scale)
        assert not constant


def test_a_layer_that_never_varies_is_undefined_across_blocks(rng):
    xs, ys = _maps(rng, 12)
    ys[:] = ys[0]  # the same maps in every image
    value, _ = _in_blocks(xs, ys, [4, 8], 2, 4)
    assert value.reason == hsic.ZERO_VARIANCE.format(side="layer_b")
    ys[8:] += 1.0  # constant within each batch, different between them: it varies
    value, _ = _in_blocks(xs, ys, [4, 8], 2, 4)
    assert "<= 0" in value.reason


def test_too_few_images_and_images_after_finish(rng):
    xs, ys = _maps(rng, 5)
    metric = _metric(batch_size=4)
    for i in range(3):
        metric.update(f"i{i}", _image(xs, ys, i))
    assert "n=3 < 4" in metric.finish("a", "b")[("x", "y")].reason
    with pytest.raises(Exception, match="after finish"):
        metric.update("late", _image(xs, ys, 3))


# --------------------------------------------------------------------------- in a run
def test_a_run_in_blocks_cutting_batches_equals_plain_hooks(tmp_path):
    """pool: none in a run of 11 images in blocks of 3 (every batch of 4 cut by a block end),
    against the float64 reference on activations taken with plain forward hooks."""
    import pandas as pd

    from mapsim.models.build import build_model
    from mapsim.registry import load_registry
    from mapsim.runner.run import run
    from mapsim.spec.run_spec import validate_spec

    images = {"name": "synthetic-vessels", "count": 11, "size": [24, 24], "seed": 5}
    spec = validate_spec({
        "name": "minibatch",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 2, "width": 3}, "seed": 1},
                   "b": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 2}},
        "layers": {"a": ["blocks.1"], "b": ["blocks.0"]}, "images": images,
        "comparisons": [["a", "b"]],
        "metrics": [{"name": "cka", "samples": "images", "pool": "none", "batch_size": 4}],
        "aggregators": ["max"], "engine": {"block_images": 3}, "device": "cpu",
    })
    out = run(spec, out_dir=tmp_path / "out", progress=False).out_dir
    table = pd.read_csv(out / "layer_similarity.csv")
    value = table.loc[table.image == "all-images", "value"].item()

    registry = load_registry()
    dataset = registry.create("dataset", "synthetic-vessels", {k: v for k, v in images.items()
                                                               if k != "name"})
    acts = {}
    for name, width, seed, path in (("a", 3, 1, "blocks.1"), ("b", 4, 2, "blocks.0")):
        arch = registry.create("architecture", "fcn", {"depth": 2, "width": width})
        module = build_model(name, architecture=arch, seed=seed).module.eval()
        captured = []
        handle = dict(module.named_modules())[path].register_forward_hook(
            lambda m, i, o: captured.append(o.detach().double().numpy()[0]))
        with torch.no_grad():
            for item in dataset:
                module(torch.from_numpy(item.image)[None])
        handle.remove()
        acts[name] = np.stack(captured)
    assert value == pytest.approx(reference_cka(acts["a"], acts["b"], 4), abs=1e-6)


def test_variance_moments_equal_float64_numpy(rng):
    """A run of metrics over images only computes the variances alone (dead-map flags)."""
    from mapsim.engine.moments import variance_moments

    z = (rng.standard_normal((7, 5000)) * [[1], [2], [0], [1e-3], [5], [1], [3]]
         + [[1e3], [0], [4], [7], [-2], [0], [1]]).astype(np.float32)
    moments = variance_moments(torch.from_numpy(z))
    zd = z.astype(np.float64)
    np.testing.assert_allclose(moments.mean.numpy(), zd.mean(1), rtol=1e-12)
    expected = ((zd - zd.mean(1, keepdims=True)) ** 2).sum(1)
    np.testing.assert_allclose(torch.diagonal(moments.comoment).numpy(), expected,
                               rtol=1e-6, atol=1e-9)
    assert moments.variance()[2] == 0.0  # a constant map is dead, exactly


def test_variances_without_stacking_equal_the_stacked_moments(rng):
    from mapsim.engine.moments import compute_moments
    from mapsim.engine.similarity import stack_maps, variances_only

    maps = {"a": {"x": torch.from_numpy(rng.standard_normal((3, 9, 7)) + 40).float(),
                  "y": torch.zeros(2, 9, 7)},  # dead maps
            "b": {"z": torch.from_numpy(rng.standard_normal((4, 9, 7)) ** 2).float()}}
    stack, moments = variances_only(maps, ["a", "b"])
    reference = compute_moments(stack_maps(maps, ["a", "b"]).z)
    assert stack.blocks == stack_maps(maps, ["a", "b"]).blocks and moments.n == 63
    np.testing.assert_allclose(moments.mean.numpy(), reference.mean.numpy(), rtol=1e-7)
    np.testing.assert_allclose(moments.variance().numpy(), reference.variance().numpy(),
                               rtol=1e-6, atol=1e-12)
    assert (moments.variance()[3:5] == 0).all()
    maps["b"]["z"] = torch.ones(4, 5, 5)  # another size: the stacking path says why
    assert variances_only(maps, ["a", "b"]) is None


@pytest.mark.parametrize("channels_last", [False, True])
def test_variances_in_chunks_match_float64(rng, channels_last):
    """Maps of several chunks and a partial last one, in either memory order, with a large
    mean and a constant map: float64 numpy's means and centred sums of squares."""
    from mapsim.engine.similarity import VARIANCE_CHUNK, variances_only

    side = int((2.5 * VARIANCE_CHUNK) ** 0.5) + 1
    spread = np.array([1.0, 1e-3, 3.0, 1.0, 2.0])[:, None, None]
    values = rng.standard_normal((5, side, side + 3)) * spread
    values[1] += 500.0  # a large mean beside a small spread
    values[3] = 7.25  # a constant map
    maps = torch.from_numpy(values).float()
    if channels_last:
        maps = maps[None].contiguous(memory_format=torch.channels_last)[0]
        assert not maps.is_contiguous()
    _, moments = variances_only({"m": {"x": maps}}, ["m"])
    exact = maps.double().numpy().reshape(5, -1)
    mean = exact.mean(axis=1)
    squares = ((exact - mean[:, None]) ** 2).sum(axis=1)
    # float32 chunk means: exact to ~1e-7 of the values' magnitude
    np.testing.assert_allclose(moments.mean.numpy(), mean, rtol=1e-6, atol=1e-6)
    # float32 chunk means: the merge's between-chunk term costs a relative error of about
    # 1e-7 x (mean / spread) in the sums of squares (6.5e-5 for map 1, mean 5e5 x spread)
    np.testing.assert_allclose(np.diag(moments.comoment.numpy()), squares, rtol=1e-4)
    ordinary = [0, 2, 4]
    np.testing.assert_allclose(np.diag(moments.comoment.numpy())[ordinary], squares[ordinary],
                               rtol=1e-6)
    assert moments.comoment[3, 3] == 0.0  # dead, exactly


def test_a_run_of_metrics_over_images_counts_dead_maps_as_before(tmp_path):
    from mapsim.runner.run import run
    from mapsim.spec.run_spec import validate_spec

    def spec(metrics):
        return validate_spec({
            "name": "dead", "models": {"a": {"architecture": {"name": "fcn", "depth": 2,
                                                               "width": 8}, "seed": 3}},
            "layers": {"a": ["blocks.0", "blocks.1"]},
            "images": {"name": "synthetic-vessels", "count": 5, "size": [24, 24], "seed": 1},
            "comparisons": [["a", "a"]], "metrics": metrics, "aggregators": ["max"],
            "device": "cpu"})  # the spatial null on: it has nothing to do without map metrics

    import pandas as pd

    cka = {"name": "cka", "samples": "images", "pool": "none", "batch_size": 4}
    alone = run(spec([cka]), out_dir=tmp_path / "alone", progress=False).out_dir
    beside = run(spec([cka, "pearson"]), out_dir=tmp_path / "beside", progress=False).out_dir
    a = pd.read_csv(alone / "dead_maps.csv")
    b = pd.read_csv(beside / "dead_maps.csv")
    b = b[b.metric == "cka"].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_csv(alone / "layer_similarity.csv"),
                                  pd.read_csv(beside / "layer_similarity.csv").query(
                                      "metric == 'cka'").reset_index(drop=True))


def test_channels_last_features_give_the_same_cka(rng):
    """On a GPU the maps are channels-last and taken without a copy, in pixel-major order:
    the same CKA as the maps in channel-major order."""
    def cka_of(channels_last: bool) -> dict:
        metric = CKA.create(CKAParams(samples="images", pool="none", batch_size=5,
                                      permutations=0))
        gen = np.random.default_rng(7)
        for i in range(10):
            a = torch.from_numpy(np.maximum(gen.standard_normal((1, 4, 6, 7)), 0)).float()
            b = a[:, :3] + torch.from_numpy(gen.standard_normal((1, 3, 6, 7))).float()
            if channels_last:
                a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
            metric.update(f"i{i}", {"m": {"x": a[0], "y": b[0]}})
        return metric.finish("m", "m")

    plain, last = cka_of(False), cka_of(True)
    assert plain.keys() == last.keys()
    for key in plain:
        assert float(last[key]) == pytest.approx(float(plain[key]), abs=1e-12), key
    assert 0.2 < float(plain[("x", "y")]) < 0.99
