"""FFT convolution (plugins/fcn/fftconv.py) and its use in ``fcn`` (parameter ``conv``).

Reference: ``F.conv2d`` in float64. The FFT path's error must be of the order of float32
direct convolution's own error against that reference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mapsim.plugins.fcn import fftconv
from mapsim.plugins.fcn.fftconv import fft_conv2d
from mapsim.models.build import build_model
from mapsim.registry import load_registry
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec
from mapsim.plugins.fcn import FCN, Conv2d, FCNArchitecture


def _errors(x, w, b, padding):
    """(max |fft - float64|, max |direct float32 - float64|, max |float64|)."""
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=padding)
    with torch.inference_mode():
        got = fft_conv2d(x, w, b, padding)
        direct = F.conv2d(x, w, b, padding=padding)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    return ((got.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item(),
            ref.abs().max().item())


@pytest.mark.parametrize(
    ("n", "c", "o", "h", "w", "kh", "kw", "padding"),
    [
        (2, 64, 64, 40, 52, 7, 7, 3),  # the study's layer, batched, several tiles
        (1, 3, 5, 9, 7, 5, 5, 2),  # image smaller than a tile
        (1, 4, 6, 1, 1, 7, 7, 3),  # a single pixel: only the kernel centre counts
        (2, 8, 3, 20, 33, 3, 5, (1, 2)),  # rectangular kernel, 'same' padding per axis
        (1, 5, 4, 17, 19, 7, 7, 0),  # 'valid' convolution
        (1, 5, 4, 17, 19, 5, 5, 4),  # more padding than 'same'
        (1, 2, 2, 70, 9, 1, 1, 0),  # 1x1 kernel
    ],
)
def test_equals_float64_direct_convolution(n, c, o, h, w, kh, kw, padding) -> None:
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w)
    weight = torch.randn(o, c, kh, kw) / (c * kh * kw) ** 0.5
    bias = torch.randn(o)
    fft_err, direct_err, scale = _errors(x, weight, bias, padding)
    # same order as float32 direct convolution, and float32-level relative to the output scale
    assert fft_err <= max(10 * direct_err, 2e-6 * scale), (fft_err, direct_err, scale)
    assert fft_err <= 1e-5 * scale


@pytest.mark.parametrize("padding", [3, 0])
def test_an_empty_batch_gives_an_empty_output_of_the_right_shape(padding) -> None:
    """As F.conv2d does (the fast path learns layouts from an empty batch)."""
    x = torch.empty(0, 4, 20, 23)
    weight, bias = torch.randn(6, 4, 7, 7), torch.randn(6)
    with torch.inference_mode():
        got = fft_conv2d(x, weight, bias, padding)
    assert got.shape == F.conv2d(x, weight, bias, padding=padding).shape
    assert got.dtype == x.dtype


def test_kernel_is_not_flipped_and_padding_is_zero() -> None:
    """A one-hot kernel shifts the image (cross-correlation), filling with zeros."""
    x = torch.arange(1.0, 26.0).view(1, 1, 5, 5)
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 0, 2] = 1.0  # out[i, j] = x[i - 1, j + 1]
    with torch.inference_mode():
        out = fft_conv2d(x, weight, None, 1)[0, 0]
    expected = torch.zeros(5, 5)
    expected[1:, :4] = x[0, 0, :4, 1:]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_tile_sizes_are_powers_of_two_that_leave_valid_outputs() -> None:
    for k, size in [(7, 256), (7, 1104), (3, 64), (5, 9), (31, 40), (129, 130)]:
        t = fftconv.tile_size(k, size, size)
        assert t & (t - 1) == 0 and t - k + 1 >= 2


def test_kernel_spectrum_is_cached_and_follows_weight_changes() -> None:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 4, 5, padding=2)
    x = torch.randn(1, 4, 12, 12)
    with torch.inference_mode():
        fft_conv2d(x, conv.weight, conv.bias, 2)
    spectrum = fftconv._SPECTRA[id(conv.weight)][2]
    with torch.inference_mode():
        fft_conv2d(x, conv.weight, conv.bias, 2)
    assert fftconv._SPECTRA[id(conv.weight)][2] is spectrum  # reused
    changes = [
        lambda: conv.load_state_dict({"weight": torch.randn(4, 4, 5, 5), "bias": conv.bias}),
        lambda: conv.weight.data.mul_(-0.5),  # .data: no version bump, caught by the fingerprint
    ]
    for change in changes:
        with torch.no_grad():
            change()
        with torch.inference_mode():
            got = fft_conv2d(x, conv.weight, conv.bias, 2)
            expected = F.conv2d(x, conv.weight, conv.bias, padding=2)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    ident = id(conv.weight)
    del conv
    assert ident not in fftconv._SPECTRA  # the cache entry goes with the weight


def _fcn(conv: str, in_channels: int = 1) -> FCN:
    torch.manual_seed(2)
    return FCN(depth=3, width=16, kernel_size=7, in_channels=in_channels, conv=conv).eval()


def test_fcn_dispatch_rule() -> None:
    x = torch.randn(1, 16, 20, 20)
    auto, fft, direct = _fcn("auto"), _fcn("fft"), _fcn("direct")
    with torch.inference_mode():
        assert not auto.blocks[0].conv.uses_fft(x[:, :1])  # 1 input map: direct is cheaper
        assert auto.blocks[1].conv.uses_fft(x)
        assert fft.blocks[0].conv.uses_fft(x[:, :1])
        assert not direct.blocks[1].conv.uses_fft(x)
        assert not auto.blocks[1].conv.uses_fft(x.double())  # float32 only
        small = FCN(depth=2, width=16, kernel_size=3).eval()
        assert not small.blocks[1].conv.uses_fft(x)  # 3x3: direct
    assert not auto.blocks[1].conv.uses_fft(x)  # gradients on: direct
    auto.train()
    with torch.inference_mode():
        assert not auto.blocks[1].conv.uses_fft(x)  # training: direct


def test_fcn_fft_forward_equals_direct_keeps_keys_and_fires_hooks() -> None:
    x = torch.randn(2, 1, 30, 26)
    fft, direct = _fcn("fft"), _fcn("direct")
    assert list(fft.state_dict()) == list(direct.state_dict())
    fft.load_state_dict(direct.state_dict())
    for name, module in fft.named_modules():
        if name.endswith("conv"):
            assert isinstance(module, torch.nn.Conv2d) and isinstance(module, Conv2d)
    seen = {}
    fft.blocks[1].conv.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.inference_mode():
        a, b = fft(x), direct(x)
    assert seen["o"].shape == (2, 16, 30, 26)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_training_uses_direct_convolution_and_gradients_flow() -> None:
    model = _fcn("fft").train()
    x = torch.randn(2, 1, 12, 12)
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_scripted_fcn_still_works() -> None:
    model = _fcn("fft")
    scripted = torch.jit.script(model)
    x = torch.randn(1, 1, 10, 10)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------- the bundled CNN6 on a vessel image

LAYERS = ["blocks.0", "blocks.1", "blocks.3", "blocks.5"]


@pytest.fixture(scope="module")
def vessel_image():
    """One 128 x 128 synthetic vessel image with the training appearance (seed 7)."""
    params = {"count": 1, "size": [128, 128], "seed": 7}
    return next(iter(load_registry().create("dataset", "synthetic-vessels", params)))


def test_pretrained_cnn6_activations_against_float64(vessel_image) -> None:
    def arch(conv):
        return FCNArchitecture(FCNArchitecture.Params(depth=6, width=64, kernel_size=7,
                                                      conv=conv))

    errors = {}
    ref = build_model("r", architecture=arch("direct"), weights="pretrained:cnn6").module.double()
    x = torch.as_tensor(vessel_image.image, dtype=torch.float32).unsqueeze(0)
    with torch.inference_mode():
        want = ref.blocks[:6](x.double())
        for conv in ("fft", "direct"):
            model = build_model("m", architecture=arch(conv), weights="pretrained:cnn6").module
            got = model.blocks[:6](x)
            assert got.dtype == torch.float32
            errors[conv] = ((got.double() - want).abs().max() / want.abs().max()).item()
    print(f"CNN6 blocks.5, max error / max |activation| vs float64: {errors}")
    # same order as float32 direct convolution
    assert errors["fft"] <= max(10 * errors["direct"], 1e-6), errors


def test_pretrained_cnn6_pearson_agrees_between_fft_and_direct(vessel_image, tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "vessel.png"
    pixels = np.clip(vessel_image.image[0] * 40 + 128, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    tables = {}
    for conv in ("fft", "direct"):
        spec = validate_spec({
            "name": f"cnn6-{conv}",
            "models": {"cnn6": {"architecture": {"name": "fcn", "depth": 6, "width": 64,
                                                 "kernel_size": 7, "conv": conv},
                                "weights": "pretrained:cnn6"}},
            "layers": {"cnn6": LAYERS},
            "images": {"name": "files", "paths": [str(path)]},
            "comparisons": [["cnn6", "cnn6"]],
            "metrics": ["pearson"],
            "aggregators": ["max"],
            "device": "cpu",
        })
        out = run(spec, out_dir=tmp_path / conv, progress=False).out_dir
        csvs = sorted(out.rglob("*.csv"))
        assert csvs
        tables[conv] = {p.relative_to(out): pd.read_csv(p) for p in csvs}
    assert tables["fft"].keys() == tables["direct"].keys()
    compared, largest = 0, 0.0
    for key, fft in tables["fft"].items():
        direct = tables["direct"][key]
        assert fft.shape == direct.shape
        for column in fft.select_dtypes("float").columns:
            diff = (fft[column] - direct[column]).abs().max()
            assert diff <= 1e-5 or pd.isna(diff), (key, column, diff)
            compared += 1
            largest = max(largest, 0.0 if pd.isna(diff) else float(diff))
    print(f"CNN6 Pearson tables, largest |fft - direct| over {compared} columns: {largest:.2e}")
    assert compared > 0


def test_bad_shapes_get_a_clear_error() -> None:
    from mapsim.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match="same C"):
        fft_conv2d(torch.randn(1, 3, 8, 8), torch.randn(2, 4, 3, 3), None, 1)
    with pytest.raises(ShapeMismatchError, match="no output"):
        fft_conv2d(torch.randn(1, 3, 2, 2), torch.randn(2, 3, 5, 5), None, 0)


def test_rows_of_tiles_give_the_whole_pass(monkeypatch):
    """A small TILE_BYTES makes fft_conv2d go through the tiles in rows (bounded memory): the
    same values as one pass and as F.conv2d."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 61, 47, generator=generator)
    weight = torch.randn(4, 5, 7, 7, generator=generator)
    bias = torch.randn(4, generator=generator)
    whole = fftconv.fft_conv2d(x, weight, bias, 3)
    monkeypatch.setattr(fftconv, "TILE_BYTES", 1)  # one row of tiles per pass
    rows = fftconv.fft_conv2d(x, weight, bias, 3)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=3)
    assert rows.shape == expected.shape and rows.is_contiguous()
    scale = float(expected.abs().max())
    assert float((rows.double() - expected).abs().max()) <= 1e-5 * scale
    assert float((rows - whole).abs().max()) <= 1e-6 * scale
