"""Output selectors in layer paths (block[0], head['logits'], .attribute, module#2), checked
against direct calls of the same modules, and the errors for bad selectors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.io import imsave
from torch import nn

from mapsim.errors import ExtractionError, LayerOutputError
from mapsim.models.layers import resolve_layers
from mapsim.models.selectors import parse_layer, split_path
from mapsim.plugins.hooks import HooksExtractor
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec


@dataclass
class Out:
    maps: torch.Tensor
    score: torch.Tensor


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.a(x), self.b(x)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        y = self.conv(x)
        return {"logits": y, "extra": (y * 2, y.mean())}


class Dc(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return Out(y, y.sum())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pair = Pair()
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.head = Head()
        self.dc = Dc()

    def forward(self, x):
        first, _ = self.pair(x)
        h = torch.relu(self.shared(first))
        h = self.shared(h)  # the same module, called twice
        self.dc(h)
        return self.head(h)


@pytest.fixture
def net():
    return Net().eval()


def direct(net, x):
    """The same tensors, computed by calling the modules ourselves."""
    with torch.no_grad():
        first, second = net.pair(x)
        s1 = net.shared(first)
        s2 = net.shared(torch.relu(s1))
        head = net.head(s2)
        return {"pair[0]": first, "pair[1]": second, "shared#1": s1, "shared#2": s2,
                "head['logits']": head["logits"], "head['extra'][0]": head["extra"][0],
                "dc.maps": None, "dc['maps']": net.dc(s2).maps, "dc#1.maps": net.dc(s2).maps}


def test_selected_outputs_equal_direct_calls(net):
    x = torch.randn(1, 3, 9, 7)
    want = direct(net, x)
    layers = [k for k in want if want[k] is not None]
    got = HooksExtractor().extract(net, layers, x)
    for layer in layers:
        torch.testing.assert_close(got[layer], want[layer], rtol=0, atol=0)
    streamed = {}
    HooksExtractor().stream(net, layers, x, lambda p, t: streamed.__setitem__(p, t.clone()))
    for layer in layers:
        torch.testing.assert_close(streamed[layer], want[layer], rtol=0, atol=0)


@pytest.mark.parametrize(("layer", "message"), [
    ("shared", r"ran more than once.*'shared#1' or 'shared#2'"),
    ("pair", r"tuple of 2: \[0\] Tensor 1x4x9x7, \[1\] Tensor 1x2x9x7, not a tensor.*pair\[0\]"),
    ("pair[2]", r"index 2 is out of range for a tuple of 2.*tuple of 2: \[0\] Tensor 1x4x9x7"),
    ("head['nope']", r"no key 'nope'.*dict with keys 'logits' \(Tensor 1x5x9x7\), 'extra'"),
    ("head['extra']", r"gives a tuple of 2: \[0\] Tensor 1x5x9x7, \[1\] Tensor , not a tensor"),
    ("dc['nope']", r"no key or attribute 'nope'.*Out \(dataclass\) with fields 'maps'"),
    ("head[0]", r"\[0\] selects an item of a tuple or list.*dict with keys"),
])
def test_bad_selectors_name_the_output_structure(net, layer, message):
    with pytest.raises(LayerOutputError, match=message):
        HooksExtractor().extract(net, [layer], torch.randn(1, 3, 9, 7))


def test_a_call_that_never_happens_says_how_often_the_module_ran(net):
    with pytest.raises(ExtractionError, match=r"'shared#3'.*ran 2 time\(s\)"):
        HooksExtractor().extract(net, ["shared#3"], torch.randn(1, 3, 9, 7))


def test_parsing_and_pattern_resolution():
    assert split_path("blocks.[0246]") == ("blocks.[0246]", "")  # a wildcard set
    assert split_path("blocks.0[1]") == ("blocks.0", "[1]")
    assert parse_layer("enc.1#2[0]['k'].v").steps == (("index", 0), ("key", "k"), ("key", "v"))
    assert parse_layer("enc.1#2").call == 2
    with pytest.raises(LayerOutputError, match="call number from 1"):
        parse_layer("enc#0")
    available = ["blocks", "blocks.0", "blocks.1", "head"]
    assert resolve_layers(available, ["head['x']", "blocks.*[0]", "blocks.0"], "m") == [
        "blocks.0", "blocks.0[0]", "blocks.1[0]", "head['x']"]


MODEL = '''
import torch
from torch import nn


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.shared = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        h = self.shared(torch.tanh(self.stem(x)))
        return (self.shared(torch.tanh(h)), h)


def build():
    return Twice()
'''


def test_a_run_with_selectors_matches_float64_pearson(tmp_path: Path):
    (tmp_path / "selectors_twice.py").write_text(MODEL)
    rng = np.random.default_rng(1)
    image = (rng.random((12, 10)) * 255).astype(np.uint8)
    imsave(tmp_path / "img.png", image, check_contrast=False)
    spec = validate_spec({
        "name": "sel", "models": {"t": {"python": "selectors_twice:build"}},
        "layers": {"t": {"first": "shared#1", "second": "shared#2"}},
        "images": str(tmp_path / "img.png"), "aggregators": ["max"],
        "output": {"pairs": True},
    })
    result = run(spec, base_dir=tmp_path, out_dir=tmp_path / "out")
    import selectors_twice

    module = selectors_twice.build().eval()
    x = image.astype(np.float64)
    x = torch.from_numpy((x - x.mean()) / x.std()).float()[None, None]
    with torch.no_grad():
        first = module.shared(torch.tanh(module.stem(x)))
        second = module.shared(torch.tanh(first))
    maps = {"first": first[0].double().numpy().reshape(3, -1),
            "second": second[0].double().numpy().reshape(3, -1)}
    pairs = pd.read_csv(result.out_dir / "pairs.csv")
    for (la, lb), rows in pairs.groupby(["layer_a", "layer_b"]):
        za = maps[la] - maps[la].mean(1, keepdims=True)
        zb = maps[lb] - maps[lb].mean(1, keepdims=True)
        want = za @ zb.T / np.sqrt(np.outer((za ** 2).sum(1), (zb ** 2).sum(1)))
        got = rows.pivot(index="map_a", columns="map_b", values="value").to_numpy()
        np.testing.assert_allclose(got, np.abs(want), atol=2e-5)  # the study: |r|
    assert result.info["models"]["t"]["layers"] == {"first": "shared#1", "second": "shared#2"}
