"""Token maps: (1, L, D) transformer outputs read as D maps on the patch grid, checked against
a hand-made reshaping (tokens that are a conv map's pixels give |r| = 1 with that conv's
maps), grid inference and its refusals, and the ViT-vs-FCN example spec."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.io import imsave

from mapsim.errors import ExtractionError, LayerOutputError, SpecError
from mapsim.models.tokens import token_grid, token_maps
from mapsim.runner.run import run
from mapsim.spec.run_spec import TokenSpec, validate_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(("n", "spec", "want"), [
    (197, {}, (14, 14, 1)), (196, {}, (14, 14, 0)), (201, {}, (14, 14, 5)),
    (200, {"drop": 4}, (14, 14, 4)), (97, {"grid": [8, 12]}, (8, 12, 1)),
    (96, {"grid": [8, 12], "drop": 0}, (8, 12, 0)),
])
def test_grid(n, spec, want):
    assert token_grid(n, TokenSpec(**spec), "x") == want


@pytest.mark.parametrize(("n", "spec", "message"), [
    (97, {}, r"97 tokens, which is not a square patch grid.*give the grid"),
    (50, {"drop": 2}, r"not a square patch grid after 2"),
    (90, {"grid": [8, 12]}, r"needs at least 96"),
    (98, {"grid": [8, 12], "drop": 1}, r"with 1 dropped tokens needs 97"),
])
def test_grid_refusals(n, spec, message):
    with pytest.raises(LayerOutputError, match=message):
        token_grid(n, TokenSpec(**spec), "x")


def test_token_maps_put_each_token_at_its_grid_cell():
    rng = np.random.default_rng(0)
    out = rng.normal(size=(1, 2 + 3 * 4, 5))
    maps = token_maps(torch.tensor(out), TokenSpec(grid=(3, 4)), "x").numpy()
    want = np.empty((1, 5, 3, 4))
    for i in range(3):
        for j in range(4):
            want[0, :, i, j] = out[0, 2 + i * 4 + j, :]  # row-major, after 2 leading tokens
    np.testing.assert_array_equal(maps, want)


MODEL = '''
import torch
from torch import nn


class Tokens(nn.Module):
    """(N, C, H, W) maps -> (N, 1 + H*W, C) tokens: a class token, then one per pixel."""

    def __init__(self, channels):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, channels))

    def forward(self, x):
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1)


class ConvThenTokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.tokens = Tokens(4)

    def forward(self, x):
        return self.tokens(self.conv(x))


def build():
    return ConvThenTokens()
'''


def _setup(tmp_path: Path, shape=(12, 12)) -> Path:
    (tmp_path / "tokens_model.py").write_text(MODEL)
    rng = np.random.default_rng(4)
    imsave(tmp_path / "img.png", (rng.random(shape) * 255).astype(np.uint8),
           check_contrast=False)
    return tmp_path


def _spec(tmp_path: Path, tokens):
    return validate_spec({
        "name": "tok", "models": {"t": {"python": "tokens_model:build", "tokens": tokens}},
        "layers": {"t": ["conv", "tokens"]}, "images": str(tmp_path / "img.png"),
        "aggregators": ["max"], "output": {"pairs": True},
    })


def test_tokens_that_are_a_conv_maps_pixels_correlate_perfectly(tmp_path):
    _setup(tmp_path)
    result = run(_spec(tmp_path, "auto"), base_dir=tmp_path, out_dir=tmp_path / "out")
    pairs = pd.read_csv(result.out_dir / "pairs.csv")
    cross = pairs[(pairs.layer_a == "conv") & (pairs.layer_b == "tokens")]
    values = cross.pivot(index="map_a", columns="map_b", values="value").to_numpy()
    np.testing.assert_allclose(np.diag(values), 1.0, atol=1e-6)
    same = pairs[(pairs.layer_a == "conv") & (pairs.layer_b == "conv")]
    conv = same.pivot(index="map_a", columns="map_b", values="value").to_numpy()
    np.testing.assert_allclose(values, conv, atol=1e-6)  # the same maps, whatever the layer


def test_non_square_grids_need_the_grid(tmp_path):
    _setup(tmp_path, shape=(8, 12))
    with pytest.raises(LayerOutputError, match=r"97 tokens.*tokens: \{grid"):
        run(_spec(tmp_path, "auto"), base_dir=tmp_path, out_dir=tmp_path / "a")
    result = run(_spec(tmp_path, {"grid": [8, 12]}), base_dir=tmp_path, out_dir=tmp_path / "b")
    pairs = pd.read_csv(result.out_dir / "pairs.csv")
    cross = pairs[(pairs.layer_a == "conv") & (pairs.layer_b == "tokens")
                  & (pairs.map_a == pairs.map_b)]
    np.testing.assert_allclose(cross["value"], 1.0, atol=1e-6)


def test_without_tokens_a_3d_output_is_refused_with_the_option(tmp_path):
    _setup(tmp_path)
    with pytest.raises(ExtractionError, match=r"\(1, 145, 4\).*models\.t\.tokens: auto"):
        run(_spec(tmp_path, None), base_dir=tmp_path, out_dir=tmp_path / "none")
    with pytest.raises(SpecError, match="tokens"):
        _spec(tmp_path, {"grid": [0, 3]})


def test_the_vit_example_runs_against_the_bundled_fcn(tmp_path):
    for name in ("vit.yaml", "tiny_vit.py"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    shutil.copytree(EXAMPLES / "data", tmp_path / "data")
    from mapsim.session import load_spec

    spec = load_spec(tmp_path / "vit.yaml")
    result = run(spec, base_dir=tmp_path, out_dir=tmp_path / "out")
    best = pd.read_csv(result.out_dir / "max.csv")
    assert set(best["aligned"]) == {"smaller/area 16x16"}
    maps = best.groupby(["model_a", "layer_a"]).map_a.nunique().to_dict()
    assert maps[("vit", "B1")] == 32 and maps[("cnn6", "L6")] == 64
    assert {("vit", "cnn6"), ("cnn6", "vit")} <= set(zip(best.model_a, best.model_b))
