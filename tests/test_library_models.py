"""Models from a library through ``python:`` (issue 18, item 5): Hugging Face ``transformers``
models built from a config by ``mapsim.models.library:transformers_model``, randomly
initialised with no network access; a ViT's token maps and selectors of its tuple outputs, a
ConvNeXt's ModelOutput selector, all checked against float64 Pearson on the model's own
outputs (``output_hidden_states``, not hooks) reshaped by hand; clear refusals."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.io import imsave

from mapsim.errors import MapsimError
from mapsim.models.build import build_model
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec

transformers = pytest.importorskip("transformers")

FACTORY = "mapsim.models.library:transformers_model"
VIT = {"model": "ViTModel", "add_pooling_layer": False,
       "config": {"image_size": 32, "patch_size": 4, "num_channels": 1, "hidden_size": 12,
                  "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24}}
CONVNEXT = {"model": "ConvNextModel",
            "config": {"num_channels": 1, "num_stages": 2, "hidden_sizes": [6, 10],
                       "depths": [1, 1], "patch_size": 2}}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Building and running the models must not touch the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def image(tmp_path: Path) -> np.ndarray:
    yy, xx = np.mgrid[0:32, 0:32]
    rng = np.random.default_rng(3)
    pixels = np.clip(128 + 80 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
                     + 25 * rng.standard_normal((32, 32)), 0, 255).astype(np.uint8)
    imsave(tmp_path / "img.png", pixels, check_contrast=False)
    return pixels


def zscored(pixels: np.ndarray) -> torch.Tensor:
    x = pixels.astype(np.float64)
    return torch.from_numpy((x - x.mean()) / x.std()).float()[None, None]


def pearson64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n_a, n_b) Pearson r of the rows of a and b, float64."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def pairs_matrix(pairs: pd.DataFrame, la: str, lb: str) -> np.ndarray:
    """|r| of two layers' maps from pairs.csv (mapsim's pearson reports |r|)."""
    rows = pairs[(pairs.layer_a == la) & (pairs.layer_b == lb)]
    return np.abs(rows.pivot(index="map_a", columns="map_b", values="value").to_numpy())


def spec(tmp_path, kwargs, layers, tokens=None):
    model = {"python": FACTORY, "kwargs": kwargs, "seed": 5}
    if tokens is not None:
        model["tokens"] = tokens
    return validate_spec({
        "name": "lib", "models": {"m": model}, "layers": {"m": layers},
        "images": str(tmp_path / "img.png"), "metrics": ["pearson"], "aggregators": ["max"],
        "output": {"pairs": True}, "statistics": {"spatial_null": False},
    })


def test_the_factory_builds_a_seeded_random_model_without_downloads():
    a = build_model("a", python=FACTORY, kwargs=VIT, seed=5).module
    b = build_model("b", python=FACTORY, kwargs=VIT, seed=5).module
    c = build_model("c", python=FACTORY, kwargs=VIT, seed=6).module
    assert isinstance(a, transformers.ViTModel) and not a.training
    assert a.config.hidden_size == 12 and a.config.num_channels == 1
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the seed decides the weights
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_vit_token_maps_and_a_tuple_selector_against_float64(tmp_path, image):
    layers = {"B0": "layers.0", "B1": "layers.1", "A1": "layers.1.attention[0]",
              "O1": "layers.1.attention.o_proj"}
    result = run(spec(tmp_path, VIT, layers, tokens="auto"), base_dir=tmp_path,
                 out_dir=tmp_path / "out", progress=False)
    pairs = pd.read_csv(result.out_dir / "pairs.csv")
    # the reference: the model's own hidden states (no hooks), tokens reshaped by hand
    module = build_model("m", python=FACTORY, kwargs=VIT, seed=5).module
    with torch.no_grad():
        out = module(zscored(image), output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings, then one per layer

    def maps(hidden: torch.Tensor) -> np.ndarray:
        tokens = hidden[0].double().numpy()  # (1 + 64, 12): class token first
        grid = tokens[1:].reshape(8, 8, 12)  # row-major patches
        return grid.transpose(2, 0, 1).reshape(12, -1)

    ref = {"B0": maps(out.hidden_states[1]), "B1": maps(out.hidden_states[2])}
    for la, lb in [("B0", "B0"), ("B0", "B1"), ("B1", "B1")]:
        np.testing.assert_allclose(pairs_matrix(pairs, la, lb),
                                   np.abs(pearson64(ref[la], ref[lb])), atol=2e-5)
    # layers.1.attention returns a tuple (output, attention weights); [0] is its output
    # projection's: channel for channel the same maps
    attention = pairs_matrix(pairs, "A1", "O1")
    assert attention.shape == (12, 12)
    np.testing.assert_allclose(np.diag(attention), 1.0, atol=1e-6)


def test_convnext_model_output_selector_against_float64(tmp_path, image):
    layers = {"S1": "encoder.stages.1", "E": "encoder['last_hidden_state']"}
    result = run(spec(tmp_path, CONVNEXT, layers), base_dir=tmp_path,
                 out_dir=tmp_path / "out", progress=False)
    pairs = pd.read_csv(result.out_dir / "pairs.csv")
    module = build_model("m", python=FACTORY, kwargs=CONVNEXT, seed=5).module
    with torch.no_grad():
        out = module(zscored(image), output_hidden_states=True)
    # hidden_states: the embeddings' output, then each stage's (N, C, H, W)
    s1 = out.hidden_states[2][0].double().flatten(1).numpy()
    last = out.last_hidden_state[0].double().flatten(1).numpy()
    assert s1.shape == last.shape == (10, 64)
    np.testing.assert_allclose(pairs_matrix(pairs, "S1", "S1"), np.abs(pearson64(s1, s1)),
                               atol=2e-5)
    np.testing.assert_allclose(pairs_matrix(pairs, "E", "E"), np.abs(pearson64(last, last)),
                               atol=2e-5)
    # the encoder's ModelOutput holds the last stage's maps: the same maps, |r| = 1
    np.testing.assert_allclose(np.diag(pairs_matrix(pairs, "S1", "E")), 1.0, atol=1e-6)


def test_refusals_name_the_problem(tmp_path, image):
    with pytest.raises(MapsimError, match=r"'ViTModl' is not a model class.*ViTModel"):
        build_model("m", python=FACTORY, kwargs={"model": "ViTModl"})
    with pytest.raises(MapsimError, match=r"'num_chanels' \(did you mean 'num_channels'\?\)"):
        build_model("m", python=FACTORY, kwargs={"model": "ViTModel",
                                                  "config": {"num_chanels": 1}})
    # a selector that the output does not have: the error names the output's structure
    with pytest.raises(MapsimError, match=r"last_hidden_stat\b.*last_hidden_state"):
        run(spec(tmp_path, CONVNEXT, {"E": "encoder['last_hidden_stat']"}),
            base_dir=tmp_path, out_dir=tmp_path / "bad", progress=False)
