"""The fast path learns a new input size's layout without an extra forward pass: one forward
pass per model and image in all (the layout comes from the shapes of a run on an empty batch,
or else on the meta device), with the values of the ordinary path; a model that can run on
neither is probed with a real forward pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mapsim.plugins.fcn import FCN
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec


def _images(folder, sizes):
    rng = np.random.default_rng(4)
    paths = []
    for k, (h, w) in enumerate(sizes):
        path = folder / f"img-{k}.png"
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _spec(paths, fast: bool, device: str = "cpu"):
    return validate_spec({
        "name": "forwards",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 3, "width": 6}, "seed": 1},
                   "b": {"architecture": {"name": "fcn", "depth": 2, "width": 5}, "seed": 2}},
        "layers": {"a": ["blocks.0", "blocks.2"], "b": ["blocks.1"]},
        "images": {"name": "files", "paths": paths},
        "comparisons": [["a", "a"], ["b", "b"]],  # two comparison groups
        "metrics": ["pearson"] if fast else ["pearson", {"name": "cka", "samples": "images"}],
        "aggregators": ["max"],
        "statistics": {"spatial_null": False},
        "device": device,
    })


def test_one_forward_pass_per_model_and_image(tmp_path, monkeypatch):
    sizes = [(32, 40), (32, 40), (48, 24), (32, 40), (48, 24), (48, 24), (24, 24)]
    paths = _images(tmp_path, sizes)
    calls = []
    forward = FCN.forward

    def counted(self, x):
        if x.device.type != "meta" and x.shape[0] > 0:  # else shapes only: no arithmetic
            calls.append(tuple(x.shape[-2:]))
        else:
            shapes_only.append(x.device.type)
        return forward(self, x)

    shapes_only = []

    monkeypatch.setattr(FCN, "forward", counted)
    out = run(_spec(paths, fast=True), out_dir=tmp_path / "fast", progress=False).out_dir
    assert len(calls) == 2 * len(sizes), calls  # two models, one pass each per image
    assert all(calls[2 * k][0] == sizes[k][0] for k in range(len(sizes)))
    # an empty batch on the CPU gave every layout: 3 sizes x 2 groups, and no meta run
    assert shapes_only == ["cpu"] * 6, shapes_only
    # the same values as the ordinary path (an across-images metric keeps every image there)
    plain = run(_spec(paths, fast=False), out_dir=tmp_path / "plain", progress=False).out_dir
    fast_max = pd.read_csv(out / "max.csv")
    plain_max = pd.read_csv(plain / "max.csv")
    plain_max = plain_max[plain_max.metric == "pearson"].reset_index(drop=True)
    assert len(fast_max) == len(plain_max) > 0
    np.testing.assert_allclose(fast_max.value, plain_max.value, atol=2e-5)


@pytest.mark.parametrize("refuses", [("empty",), ("empty", "meta")])
def test_a_model_that_cannot_run_without_values_is_probed_another_way(tmp_path, monkeypatch,
                                                                        refuses):
    """A model that fails on an empty batch is probed on the meta device; one that also fails
    there (it reads values on the way) gets a real forward pass per new size and group."""
    sizes = [(32, 40), (32, 40), (24, 24)]
    paths = _images(tmp_path, sizes)
    calls, meta_runs = [], []
    forward = FCN.forward

    def needs_values(self, x):
        if x.shape[0] == 0 and "empty" in refuses:
            raise RuntimeError("cannot reshape tensor of 0 elements")
        if x.device.type == "meta":
            if "meta" in refuses:
                raise NotImplementedError("reads values")
            meta_runs.append(tuple(x.shape[-2:]))
        else:
            calls.append(tuple(x.shape[-2:]))
        return forward(self, x)

    monkeypatch.setattr(FCN, "forward", needs_values)
    out = run(_spec(paths, fast=True), out_dir=tmp_path / "out", progress=False).out_dir
    if "meta" in refuses:
        assert len(calls) == 2 * len(sizes) + 2 * 2  # a real probe per model and new size
    else:
        assert len(calls) == 2 * len(sizes) and len(meta_runs) == 2 * 2
    assert len(pd.read_csv(out / "max.csv")) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_an_empty_batch_gives_the_layout_on_a_gpu(tmp_path, monkeypatch):
    """On CUDA (channels-last models) the empty batch runs without kernels and gives every
    layout: no meta run and no real probe."""
    sizes = [(32, 40), (48, 24), (32, 40)]
    paths = _images(tmp_path, sizes)
    shapes_only = []
    forward = FCN.forward

    def counted(self, x):
        if x.device.type == "meta" or x.shape[0] == 0:
            shapes_only.append(x.device.type)
        return forward(self, x)

    monkeypatch.setattr(FCN, "forward", counted)
    result = run(_spec(paths, fast=True, device="cuda"), out_dir=tmp_path / "gpu",
                 progress=False)
    assert shapes_only == ["cuda"] * 4, shapes_only  # 2 sizes x 2 groups
    assert "layout_forward" not in result.info["timings_s"]
