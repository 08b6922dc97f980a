"""The fast path with engine.align and token maps: a run that streams (moments built in the
hooks, each output made maps and resampled there) gives the same tables as the plain path
(maps stacked, then resampled), and the plain path's refusals still come through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.io import imsave
from test_streaming import count_launches

from mapsim.engine.step import ImageStep
from mapsim.engine.streaming import probe_layout, stream_group
from mapsim.errors import ShapeMismatchError
from mapsim.runner.run import run
from mapsim.spec.run_spec import AlignSpec, validate_spec

MODEL = '''
import torch
from torch import nn


class PatchTokens(nn.Module):
    """A ViT-like stem: patches of side ``patch`` -> (N, 1 + L, 6) tokens with a class token,
    then a token-wise linear layer ``mix`` (its output is the compared layer)."""

    def __init__(self, patch):
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Conv2d(1, 6, patch + 2, stride=patch, padding=1)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.mix = nn.Linear(6, 6)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.mix(torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1))


def build(patch=4):
    return PatchTokens(patch)
'''


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "patch_tokens.py").write_text(MODEL)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[0:32, 0:32]
    for k in range(3):
        image = 128 + 90 * np.sin(xx / (3.0 + k) + yy / 5.0) + 20 * rng.standard_normal((32, 32))
        imsave(tmp_path / "images" / f"im{k}.png", np.clip(image, 0, 255).astype(np.uint8),
               check_contrast=False)
        label = (np.abs(np.sin(xx / (3.0 + k) + yy / 5.0)) > 0.8).astype(np.uint8) * 255
        imsave(tmp_path / "labels" / f"im{k}.png", label, check_contrast=False)
    return tmp_path


MODELS = {
    "u": {"architecture": {"name": "unet", "depth": 2, "width": 4}, "seed": 1},
    "f": {"architecture": {"name": "fcn", "depth": 2, "width": 5}, "seed": 2},
    "v": {"python": "patch_tokens:build", "kwargs": {"patch": 4}, "tokens": "auto"},
    "w": {"python": "patch_tokens:build", "kwargs": {"patch": 1}, "tokens": {"drop": 1}},
    "d": {"architecture": {"name": "unet", "depth": 2, "width": 4}, "seed": 3},
}
LAYERS = {"u": {"E0": "encoder.0", "B": "bottleneck", "D1": "decoder.1"},
          "f": ["blocks.0", "blocks.1"], "v": {"T": "mix"}, "w": {"T": "mix"},
          # the hooks see decoder.1 before decoder.0: rows must still be in the labels' order
          "d": {"D0": "decoder.0", "B": "bottleneck", "D1": "decoder.1", "E1": "encoder.1"}}


def spec(folder: Path, models, comparisons, engine, metrics=("pearson",), null=False):
    return validate_spec({
        "name": "s", "models": {m: MODELS[m] for m in models},
        "layers": {m: LAYERS[m] for m in models},
        "images": {"name": "files", "paths": str(folder / "images" / "*.png"),
                   "labels": str(folder / "labels")},
        "comparisons": comparisons, "metrics": list(metrics),
        "aggregators": ["max", "min", "pivot"], "engine": {"pooled": True, **engine},
        "output": {"pairs": True},
        "statistics": {"spatial_null": null},
    })


CASES = {
    "align smaller": (["u", "f"], [["u", "u"], ["u", "f"]], {"align": "smaller"}),
    "align larger": (["u", "f"], [["u", "f"]], {"align": "larger"}),
    "align nearest": (["u", "f"], [["u", "f"]], {"align": {"to": "larger", "mode": "nearest"}}),
    "align size": (["u", "f", "v"], [["u", "f"], ["v", "u"]], {"align": {"size": [12, 20]}}),
    "tokens": (["w", "f"], [["w", "w"], ["w", "f"]], {}),
    "tokens and align": (["v", "f", "u"], [["v", "v"], ["v", "f"], ["u", "v"]],
                         {"align": "smaller"}),
    "align and roi": (["u", "f"], [["u", "f"]], {"align": "larger", "roi": {"dilate": 1}}),
    "hook order": (["d", "f"], [["d", "d"], ["d", "f"]], {"align": "smaller"}),
}


@pytest.mark.parametrize("null", [False, True], ids=["", "null"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_run_equals_the_plain_run(folder, monkeypatch, case, null):
    """Every table (with the spatial null: the null's tables, baselines and p-values too)."""
    models, comparisons, engine = CASES[case]
    if null and "roi" in engine:
        pytest.skip("the null with an ROI takes the plain path (test_streaming.py)")
    metrics = ("pearson", "cosine", "cka")
    launched = count_launches(monkeypatch)
    fast = run(spec(folder, models, comparisons, engine, metrics, null), base_dir=folder,
               out_dir=folder / "fast", progress=False)
    assert launched == [True] * 3  # every image streamed (the first after a probe)
    monkeypatch.setattr(ImageStep, "streamable", property(lambda self: False))
    slow = run(spec(folder, models, comparisons, engine, metrics, null), base_dir=folder,
               out_dir=folder / "slow", progress=False)
    assert launched == [True] * 3  # the plain run never launched
    assert fast.tables == slow.tables
    for csv in sorted((folder / "slow").rglob("*.csv")):
        a = pd.read_csv(csv)
        b = pd.read_csv(folder / "fast" / csv.relative_to(folder / "slow"))
        if "map_b" in a:  # partners may differ only where two candidates tie
            ties = (a["map_b"] != b["map_b"]) & a["map_b"].notna()
            assert ties.mean() < 0.05, csv
            assert ((a["value"] - b["value"])[ties].abs() <= 2e-5).all(), csv
            a, b = a.drop(columns="map_b"), b.drop(columns="map_b")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=2e-5, atol=2e-5)
    if "align" in engine:
        assert pd.read_csv(folder / "fast" / "max.csv")["aligned"].nunique() == 1


def _maps(module, x, paths):
    from mapsim.plugins.hooks import HooksExtractor

    return HooksExtractor().extract(module, paths, x)


def test_streamed_moments_equal_float64_of_the_resampled_maps():
    """The moments built in the hooks against float64 numpy on maps made here: a U-Net's
    levels resampled by torch in float64, and tokens reshaped by hand."""
    from mapsim.models.build import build_model
    from mapsim.registry import load_registry

    arch = load_registry().create("architecture", "unet", {"depth": 2, "width": 3})
    module = build_model("u", architecture=arch, seed=4).module.eval()
    x = torch.randn(1, 1, 16, 24)
    paths = ["encoder.0", "bottleneck", "decoder.1"]
    align = AlignSpec(to="larger")
    labels = {"u": {p: p for p in paths}}

    def run_model(name, on_output):
        from mapsim.plugins.hooks import HooksExtractor

        return HooksExtractor().stream(module, paths, x, on_output)

    layout = probe_layout(["u"], run_model, labels, None, align)
    assert [b.shape for b in layout.blocks] == [(16, 24)] * 3
    assert layout.sources == [(16, 24), (4, 6), (8, 12)]
    _, moments, _ = stream_group(layout, run_model, labels, torch.device("cpu"), align=align)
    raw = _maps(module, x, paths)
    rows = []
    for p in paths:
        m = raw[p].double()
        if m.shape[2:] != (16, 24):
            m = torch.nn.functional.interpolate(m, size=(16, 24), mode="bilinear",
                                                align_corners=False)
        rows.append(m[0].reshape(m.shape[1], -1).numpy())
    z = np.concatenate(rows)
    zc = z - z.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(moments.mean.numpy(), z.mean(axis=1), atol=1e-6)
    ref = zc @ zc.T
    assert np.abs(moments.comoment.numpy() - ref).max() <= 1e-5 * np.abs(ref).max()


def test_a_roi_off_the_aligned_grid_is_refused_as_on_the_plain_path(folder):
    # to the smaller grid (8 x 8) the 32 x 32 ROI does not fit: the clear error, not a crash
    with pytest.raises(ShapeMismatchError, match="engine.roi needs the maps on the image"):
        run(spec(folder, ["u", "f"], [["u", "f"]], {"align": "smaller", "roi": {"dilate": 1}}),
            base_dir=folder, out_dir=folder / "roi", progress=False)
