"""The fast paths: symmetric product, moments built in the hooks, early stop of the forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import relu_like_maps

from mapsim.models.build import build_model
from mapsim.engine.moments import MomentsBuilder, compute_moments, symmetric_gram
from mapsim.registry import load_registry
from mapsim.engine.step import ImageStep
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec
from mapsim.plugins.hooks import HooksExtractor

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def centred64(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = z.astype(np.float64)
    mean = z.mean(axis=1)
    zc = z - mean[:, None]
    return mean, zc @ zc.T


def maps(rng, n_maps=37, side=40) -> np.ndarray:
    z = relu_like_maps(rng, n_maps, side, side).reshape(n_maps, -1)
    z[3] += 500.0  # a large-mean map: centring must keep its precision
    z[5] = 0.0  # a dead map
    return z


# float32 chunk products: ~sqrt(chunk) x 6e-8 relative; BLAS libraries round differently
# (1.2e-6 was seen with a server CPU's BLAS), hence the margin
RELATIVE = 3e-6


@pytest.mark.parametrize("block_rows,step", [(1, 100), (7, 333), (16, 1600), (100, 5000)])
def test_symmetric_gram_matches_float64(rng, block_rows, step):
    z = rng.standard_normal((23, 1600)).astype(np.float32)
    got = symmetric_gram(torch.from_numpy(z), step, block_rows).numpy()
    ref = z.astype(np.float64) @ z.astype(np.float64).T
    assert np.abs(got - ref).max() <= RELATIVE * np.abs(ref).max()
    np.testing.assert_array_equal(got, got.T)


@pytest.mark.parametrize("block_rows", [5, 128])
def test_compute_moments_blocks_agree_with_float64(rng, block_rows):
    z = maps(rng)
    mean, ref = centred64(z)
    m = compute_moments(torch.from_numpy(z), chunk_pixels=300, block_rows=block_rows)
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12, atol=1e-9)
    assert np.abs(m.comoment.numpy() - ref).max() <= RELATIVE * np.abs(ref).max()


@pytest.mark.parametrize("block_rows,f64,pixel_major", [
    (None, False, False), (8, False, False), (64, False, False), (None, True, False),
    (8, True, False), (None, False, True), (8, False, True), (8, True, True)])
def test_builder_matches_float64_and_is_reusable(rng, block_rows, f64, pixel_major):
    # 1600 pixels in chunks of 500: the last chunk is zero-padded
    builder = MomentsBuilder(37, 1600, "cpu", chunk_pixels=500, block_rows=block_rows,
                             float64_products=f64, pixel_major=pixel_major)
    for trial in range(2):  # the second image reuses the buffers
        z = maps(rng)
        builder.reset()
        for start, stop in [(0, 10), (10, 11), (11, 30), (30, 37)]:
            assert builder.add(torch.from_numpy(z[start:stop])) == slice(start, stop)
        m = builder.finish()
        mean, ref = centred64(z)
        # pixel-major: the sums of the centred values written are float32 within a chunk,
        # so the mean is exact to ~1e-8 of the maps' spread rather than to float64
        np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12,
                                   atol=2e-8 if pixel_major else 1e-9)
        assert np.abs(m.comoment.numpy() - ref).max() <= RELATIVE * np.abs(ref).max(), trial
        assert m.n == 1600
    with pytest.raises(ValueError, match="do not fit"):
        builder.reset()
        builder.add(torch.zeros(38, 1600))
    builder.reset()
    builder.add(torch.zeros(5, 1600))
    with pytest.raises(ValueError, match="only 5 of 37"):
        builder.finish()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pixel_major", [False, True])
def test_builder_takes_half_precision_maps_as_their_float32_values(rng, dtype, pixel_major):
    """Maps of an fp16/bf16 forward pass: written (widened in the kernels, pixel-major) or
    cast first (map-major), the moments are those of the maps' float32 values, and match
    float64 of the same values."""
    z = torch.from_numpy(maps(rng)).to(dtype)
    widened = z.to(torch.float32)
    got = MomentsBuilder(37, 1600, "cpu", chunk_pixels=500, pixel_major=pixel_major)
    cast = MomentsBuilder(37, 1600, "cpu", chunk_pixels=500, pixel_major=pixel_major)
    for start, stop in [(0, 10), (10, 37)]:
        got.add(z[start:stop])
        cast.add(widened[start:stop])
    m, expected = got.finish(), cast.finish()
    np.testing.assert_allclose(m.comoment.numpy(), expected.comoment.numpy(), rtol=1e-12,
                               atol=1e-9)
    np.testing.assert_allclose(m.mean.numpy(), expected.mean.numpy(), rtol=1e-12, atol=1e-12)
    mean, ref = centred64(widened.numpy())
    assert np.abs(m.comoment.numpy() - ref).max() <= RELATIVE * np.abs(ref).max()
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12, atol=2e-8)


def fcn(depth=4, width=6):
    arch = load_registry().create("architecture", "fcn", {"depth": depth, "width": width})
    return build_model("m", architecture=arch, seed=3).module.eval()


def test_stream_stops_after_the_last_layer_and_gives_the_same_outputs():
    model = fcn()
    x = torch.randn(1, 1, 24, 20)
    layers = ["blocks.0", "blocks.2"]
    ran = []
    later = [model.blocks[3].register_forward_hook(lambda *a: ran.append("blocks.3")),
             model.head.register_forward_hook(lambda *a: ran.append("head"))]
    streamed = {}
    ok = HooksExtractor().stream(model, layers, x,
                                 lambda p, out: streamed.__setitem__(p, out.clone()))
    assert ok and ran == []  # blocks.3 and the head never ran
    full = HooksExtractor().extract(model, layers, x)
    assert ran == ["blocks.3", "head"]
    for hook in later:
        hook.remove()
    for layer in layers:
        torch.testing.assert_close(streamed[layer], full[layer], rtol=0, atol=0)
    # hooks are removed after an early stop: a plain forward is unchanged
    assert not model.blocks[0]._forward_hooks and not model.blocks[2]._forward_hooks


def spec(**overrides):
    data = {
        "name": "s",
        "models": {
            "a": {"architecture": {"name": "fcn", "depth": 3, "width": 6}, "seed": 1},
            "b": {"architecture": {"name": "fcn", "depth": 2, "width": 5}, "seed": 2},
        },
        "layers": {"a": ["blocks.0", "blocks.2"], "b": {"first": "blocks.0", "last": "blocks.1"}},
        "images": {"name": "files", "paths": str(DATA / "vessels-*.png"),
                   "labels": str(DATA / "labels")},
        "comparisons": [["a", "a"], ["a", "b"]],
        "aggregators": ["max", "min", "pivot"],
        "engine": {"pooled": True},
        "output": {"pairs": True},
        "statistics": {"spatial_null": False},  # the spatial null takes the plain path
    }
    data.update(overrides)
    return validate_spec(data)


def count_launches(monkeypatch) -> list[bool]:
    """Record, per image, whether it took the fast path (``ImageStep.launch`` gave an image
    in flight) from now on in this test."""
    calls: list[bool] = []
    original = ImageStep.launch

    def counting(self, item, index=None):
        launched = original(self, item, index)
        calls.append(launched is not None)
        return launched

    monkeypatch.setattr(ImageStep, "launch", counting)
    return calls


@pytest.mark.parametrize("engine,metrics,null", [
    ({"pooled": True}, ["pearson"], False),
    ({"pooled": True, "roi": {"dilate": 2}}, ["pearson"], False),
    ({"pooled": True}, ["pearson", "cosine", "euclidean", "cka"], False),
    # the spatial null on the streaming path: the maps back from the moments buffer, shifted
    ({"pooled": True}, ["pearson"], True),
    ({"pooled": True}, ["pearson", "cosine", "euclidean", "cka"], True),
])
def test_streamed_run_equals_the_stacked_run(tmp_path, monkeypatch, engine, metrics, null):
    calls = count_launches(monkeypatch)
    limits = {"euclidean": 1.5} if "euclidean" in metrics else {}
    aggregators = ["max", "min", {"name": "threshold", "per_metric": limits}, "pivot"]
    statistics = {"spatial_null": null}
    fast = run(spec(engine=engine, metrics=metrics, aggregators=aggregators,
                    statistics=statistics), out_dir=tmp_path / "fast", progress=False)
    assert all(calls) and len(calls) >= 2  # every image streamed (the first after a probe)
    if null:
        assert (tmp_path / "fast" / "null" / "max.csv").is_file()
    monkeypatch.setattr(ImageStep, "streamable", property(lambda self: False))
    slow = run(spec(engine=engine, metrics=metrics, aggregators=aggregators,
                    statistics=statistics), out_dir=tmp_path / "slow", progress=False)
    assert fast.tables == slow.tables
    for csv in sorted((tmp_path / "slow").rglob("*.csv")):
        a = pd.read_csv(csv)
        b = pd.read_csv(tmp_path / "fast" / csv.relative_to(tmp_path / "slow"))
        # float32 chunk products in two layouts: each is within ~1e-5 of float64. Partners
        # may differ only where two candidates tie within that (e.g. cosine minima of maps
        # with disjoint support, all ~0): the values must still agree.
        if "map_b" in a:
            ties = (a["map_b"] != b["map_b"]) & a["map_b"].notna()
            assert ties.mean() < 0.05, csv
            assert ((a["value"] - b["value"])[ties].abs() <= 2e-5).all(), csv
            a, b = a.drop(columns="map_b"), b.drop(columns="map_b")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=2e-5, atol=2e-5)


def test_the_null_with_an_roi_takes_the_plain_path(tmp_path, monkeypatch):
    """The moments buffer holds only the ROI's pixels, which cannot be shifted on the grid:
    such images take the plain path, which shifts the whole maps before masking."""
    calls = count_launches(monkeypatch)
    out = run(spec(engine={"roi": {"dilate": 2}}, statistics={"spatial_null": True}),
              out_dir=tmp_path / "roi", progress=False).out_dir
    assert calls and not any(calls)
    assert len(pd.read_csv(out / "null" / "max.csv")) > 0


def test_run_with_writer_processes_equals_the_run_with_a_writer_thread(tmp_path, monkeypatch):
    import shutil

    from mapsim.runner import pipeline

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(9):
        shutil.copy(DATA / f"vessels-{k % 3 + 1}.png", folder / f"img-{k}.png")
    data = {"images": {"name": "files", "paths": str(folder / "*.png")}, "engine": {}}
    used = []
    original = pipeline.make_sink

    def recording(work, deliver, n_items, min_items_for_processes=8):
        sink = original(work, deliver, n_items, min_items_for_processes)
        used.append(type(sink).__name__)
        return sink

    monkeypatch.setattr("mapsim.runner.sinks.make_sink", recording)
    run(spec(**data), out_dir=tmp_path / "procs", progress=False)
    monkeypatch.setattr("mapsim.runner.sinks.make_sink",
                        lambda f, a, n: original(f, a, n, min_items_for_processes=10**9))
    run(spec(**data), out_dir=tmp_path / "thread", progress=False)
    assert used == ["ProcessSink"]
    for csv in sorted((tmp_path / "thread").rglob("*.csv")):
        assert csv.read_text() == (tmp_path / "procs" / csv.relative_to(tmp_path / "thread")
                                   ).read_text(), csv.name


@pytest.mark.parametrize("block_rows,pixel_major", [(None, False), (4, False), (4, True)])
def test_builder_is_exact_for_maps_that_change_level_between_chunks(rng, block_rows,
                                                                     pixel_major):
    # Each chunk is centred on its own mean before the float32 product; the levels taken out
    # (here 1000 + a different step per chunk, with small noise on top) come back exactly.
    n_maps, n_pixels, step = 9, 1000, 128  # 7 whole chunks and a padded one of 104
    levels = 1000 + 50 * rng.standard_normal((n_maps, 1)) * (np.arange(n_pixels) // step)
    z = (levels + 0.01 * rng.standard_normal((n_maps, n_pixels))).astype(np.float32)
    z[3] = 0.0
    z[3, 7] = 1e-3  # a map that is zero almost everywhere
    builder = MomentsBuilder(n_maps, n_pixels, "cpu", chunk_pixels=step, block_rows=block_rows,
                             pixel_major=pixel_major)
    builder.add(torch.from_numpy(z[:5]))
    builder.add(torch.from_numpy(z[5:]))
    m = builder.finish()
    mean, ref = centred64(z)
    # pixel-major: exact to a small fraction of each map's spread (see the test above)
    spread = z.astype(np.float64).std(axis=1)
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12,
                               atol=1e-7 * spread.min() if pixel_major else 0)
    r_got = m.comoment.numpy() / np.sqrt(np.outer(np.diag(m.comoment.numpy()),
                                                  np.diag(m.comoment.numpy())))
    r_ref = ref / np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
    assert np.abs(r_got - r_ref).max() < 1e-6


@pytest.mark.parametrize("pixel_major", [False, True])
def test_builder_takes_channels_last_maps(rng, pixel_major):
    # on GPUs the runner's activations are channels-last: (C, P) views with strides (1, C)
    n_maps, height, width = 12, 30, 41
    maps4 = torch.from_numpy(rng.standard_normal((1, n_maps, height, width)).astype(np.float32))
    strided = maps4.to(memory_format=torch.channels_last)[0].reshape(n_maps, -1)
    assert strided.stride() == (1, n_maps)
    builder = MomentsBuilder(n_maps, height * width, "cpu", chunk_pixels=256, block_rows=5,
                             pixel_major=pixel_major)
    builder.add(strided[:7])
    builder.add(strided[7:])
    m = builder.finish()
    mean, ref = centred64(maps4[0].reshape(n_maps, -1).numpy())
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12, atol=2e-8)
    assert np.abs(m.comoment.numpy() - ref).max() <= RELATIVE * np.abs(ref).max()
