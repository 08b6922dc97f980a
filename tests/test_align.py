"""engine.align: maps of different sizes resampled onto one grid, checked against float64
numpy resampling written here from the definitions (area mean, half-pixel bilinear, nearest)
and float64 Pearson; the default (no align) still refuses with a message naming the option."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.io import imsave

from mapsim.engine.similarity import stack_maps
from mapsim.errors import ShapeMismatchError, SpecError
from mapsim.runner.run import run
from mapsim.spec.run_spec import AlignSpec, validate_spec


# ---------------------------------------------------------------- float64 references
def area_ref(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Adaptive average pooling from its definition: output cell i covers input rows
    floor(i*H/h) .. ceil((i+1)*H/h)."""
    c, h_in, w_in = maps.shape
    out = np.empty((c, *size))
    for i in range(size[0]):
        r0, r1 = (i * h_in) // size[0], -(-((i + 1) * h_in) // size[0])
        for j in range(size[1]):
            c0, c1 = (j * w_in) // size[1], -(-((j + 1) * w_in) // size[1])
            out[:, i, j] = maps[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def _bilinear_axis(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centres."""
    weights = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        weights[i, lo] += 1 - frac
        weights[i, hi] += frac
    return weights


def bilinear_ref(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    wy = _bilinear_axis(maps.shape[1], size[0])
    wx = _bilinear_axis(maps.shape[2], size[1])
    return np.einsum("ih,chw,jw->cij", wy, maps, wx)


def nearest_ref(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    rows = [min(int(np.floor(i * maps.shape[1] / size[0])), maps.shape[1] - 1)
            for i in range(size[0])]
    cols = [min(int(np.floor(j * maps.shape[2] / size[1])), maps.shape[2] - 1)
            for j in range(size[1])]
    return maps[:, rows][:, :, cols]


def pearson_ref(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    za = za - za.mean(axis=1, keepdims=True)
    zb = zb - zb.mean(axis=1, keepdims=True)
    return (za @ zb.T) / np.sqrt(np.outer((za ** 2).sum(1), (zb ** 2).sum(1)))


# ---------------------------------------------------------------- stack_maps
@pytest.mark.parametrize(("align", "size", "ref"), [
    ({"to": "smaller"}, (6, 5), area_ref),
    ({"to": "larger"}, (14, 11), bilinear_ref),
    ({"to": "larger", "mode": "nearest"}, (14, 11), nearest_ref),
    ({"size": [9, 7]}, (9, 7), None),
    ({"size": [4, 3], "mode": "bilinear"}, (4, 3), bilinear_ref),
])
def test_stack_maps_resamples_like_the_definitions(align, size, ref):
    rng = np.random.default_rng(0)
    big, small = rng.normal(size=(3, 14, 11)), rng.normal(size=(2, 6, 5))
    acts = {"m": {"big": torch.tensor(big, dtype=torch.float32),
                  "small": torch.tensor(small, dtype=torch.float32)}}
    stack = stack_maps(acts, ["m"], align=AlignSpec(**align))
    assert [b.shape for b in stack.blocks] == [size, size]
    if ref is None:  # size: area where a map shrinks both ways, bilinear otherwise
        expected = [area_ref(big, size), bilinear_ref(small, size)]
    else:
        expected = [m if m.shape[1:] == size else ref(m, size) for m in (big, small)]
    want = np.concatenate([e.reshape(e.shape[0], -1) for e in expected])
    np.testing.assert_allclose(stack.z.double().numpy(), want, atol=2e-6)


def test_maps_already_on_the_grid_are_untouched():
    maps = torch.randn(2, 5, 5)
    stack = stack_maps({"m": {"a": maps, "b": torch.randn(1, 10, 10)}}, ["m"],
                       align=AlignSpec(to="smaller"))
    assert torch.equal(stack.z[:2], maps.reshape(2, -1))


def test_without_align_the_error_names_the_option():
    acts = {"m": {"a": torch.randn(2, 8, 8), "b": torch.randn(2, 4, 4)}}
    with pytest.raises(ShapeMismatchError, match=r"8 x 8.*4 x 4.*engine\.align"):
        stack_maps(acts, ["m"])


def test_spec_shorthands_and_refusals():
    def engine(align):
        return validate_spec({"models": {"a": {"architecture": {"name": "fcn", "depth": 1}}},
                              "layers": {"a": ["blocks.0"]},
                              "images": "x.png", "engine": {"align": align}}).engine.align

    assert engine("smaller") == AlignSpec(to="smaller")
    assert engine([32, 16]).size == (32, 16)
    assert engine({"to": "larger", "mode": "nearest"}).mode == "nearest"
    for bad in ("middle", {"to": "smaller", "size": [3, 3]}, {"mode": "area"}, [0, 4]):
        with pytest.raises(SpecError, match="align"):
            engine(bad)


# ---------------------------------------------------------------- a whole run
MODEL = '''
import torch
from torch import nn


class Pyramid(nn.Module):
    """A conv, its 2x2 average (a downsampled copy), a conv on that."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.down = nn.AvgPool2d(2)
        self.deep = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.deep(self.down(self.conv(x)))


def build():
    return Pyramid()
'''


@pytest.fixture
def pyramid(tmp_path: Path):
    (tmp_path / "align_pyramid.py").write_text(MODEL)
    yy, xx = np.mgrid[0:24, 0:32]
    image = (128 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    imsave(tmp_path / "img.png", image, check_contrast=False)
    return tmp_path, image


def _spec(tmp_path: Path, align):
    return validate_spec({
        "name": "align", "models": {"p": {"python": "align_pyramid:build"}},
        "layers": {"p": ["conv", "down", "deep"]}, "images": str(tmp_path / "img.png"),
        "comparisons": [["p", "p"]], "aggregators": ["max"], "output": {"pairs": True},
        "engine": {"align": align},
    })


def _reference_maps(image: np.ndarray) -> dict[str, np.ndarray]:
    import align_pyramid  # the fixture's module, imported by the run already

    module = align_pyramid.build().eval()
    x = image.astype(np.float64)
    x = (x - x.mean()) / x.std()
    with torch.no_grad():
        conv = module.conv(torch.from_numpy(x).float()[None, None])
        down = module.down(conv)
        deep = module.deep(down)
    return {k: v[0].double().numpy() for k, v in
            (("conv", conv), ("down", down), ("deep", deep))}


@pytest.mark.parametrize(("align", "size", "label"), [
    ("smaller", (12, 16), "smaller/area 12x16"),
    ("larger", (24, 32), "larger/bilinear 24x32"),
])
def test_run_pearson_equals_float64_on_the_resampled_maps(pyramid, align, size, label):
    tmp_path, image = pyramid
    result = run(_spec(tmp_path, align), base_dir=tmp_path, out_dir=tmp_path / f"out-{align}")
    maps = _reference_maps(image)
    ref = area_ref if align == "smaller" else bilinear_ref
    flat = {k: (m if m.shape[1:] == size else ref(m, size)).reshape(m.shape[0], -1)
            for k, m in maps.items()}
    pairs = pd.read_csv(result.out_dir / "pairs.csv")
    assert set(pairs["aligned"]) == {label}
    for (la, lb), rows in pairs.groupby(["layer_a", "layer_b"]):
        want = np.abs(pearson_ref(flat[la], flat[lb]))
        got = np.abs(rows.pivot(index="map_a", columns="map_b", values="value").to_numpy())
        mask = ~np.isnan(got)
        np.testing.assert_allclose(got[mask], want[mask], atol=2e-5)
    if align == "smaller":  # the pooled layer is exactly the area average of the conv
        same = pairs[(pairs.layer_a == "conv") & (pairs.layer_b == "down")
                     & (pairs.map_a == pairs.map_b)]
        np.testing.assert_allclose(same["value"].abs(), 1.0, atol=1e-5)
    else:  # its bilinear upsampling is a blurred copy of the conv
        same = pairs[(pairs.layer_a == "conv") & (pairs.layer_b == "down")
                     & (pairs.map_a == pairs.map_b)]
        assert (same["value"].abs() > 0.85).all()
    info = json.loads((result.out_dir / "run.json").read_text())
    assert info["align"]["to"] == align
    assert info["align"]["sizes"] == [{"models": ["p"], "sizes": [list(size)]}]
    for table in ("max.csv", "dead_maps.csv"):
        assert set(pd.read_csv(result.out_dir / table)["aligned"]) == {label}


def test_run_without_align_refuses_and_suggests_it(pyramid):
    tmp_path, _ = pyramid
    spec = _spec(tmp_path, None)
    with pytest.raises(ShapeMismatchError, match="engine.align"):
        run(spec, base_dir=tmp_path, out_dir=tmp_path / "out-none")
