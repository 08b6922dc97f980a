"""The study's network, architecture ``fcn``."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch

from mapsim.registry import load_registry
from mapsim.plugins.fcn import FCN, ConvModule, FCNArchitecture


def _block_params(depth: int) -> int:
    model = FCN(depth=depth, width=64, kernel_size=7)
    return sum(p.numel() for p in model.blocks.parameters())


@pytest.mark.parametrize(
    ("depth", "expected"),
    # The study reports 3.3K, 1.01M and 1.81M: 3,328 + (depth - 1) * 200,896.
    [(1, 3_328), (6, 1_007_808), (10, 1_811_392)],
)
def test_parameter_counts_match_the_study(depth: int, expected: int) -> None:
    first = 1 * 64 * 7 * 7 + 64 + 2 * 64  # conv weight + bias + batch-norm weight and bias
    further = 64 * 64 * 7 * 7 + 64 + 2 * 64
    assert (first, further) == (3_328, 200_896)
    assert expected == first + (depth - 1) * further
    assert _block_params(depth) == expected


def test_module_paths() -> None:
    model = FCN(depth=2, width=4)
    names = [name for name, _ in model.named_modules() if name]
    assert names == [
        "blocks",
        "blocks.0",
        "blocks.0.conv",
        "blocks.0.bn",
        "blocks.0.relu",
        "blocks.1",
        "blocks.1.conv",
        "blocks.1.bn",
        "blocks.1.relu",
        "head",
    ]
    block = model.blocks[0]
    assert isinstance(block, ConvModule)
    assert isinstance(block.conv, torch.nn.Conv2d) and block.conv.bias is not None
    assert isinstance(block.bn, torch.nn.BatchNorm2d)
    assert isinstance(block.relu, torch.nn.ReLU)
    assert model.blocks[1].conv.in_channels == 4


@pytest.mark.parametrize(("height", "width"), [(9, 9), (8, 10), (7, 12), (1, 1)])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_output_keeps_the_input_size(height: int, width: int, kernel_size: int) -> None:
    model = FCN(depth=2, width=3, kernel_size=kernel_size, in_channels=2, classes=5).eval()
    out = model(torch.randn(2, 2, height, width))
    assert out.shape == (2, 5, height, width)
    assert model.blocks(torch.randn(1, 2, height, width)).shape == (1, 3, height, width)


def test_architecture_builds_from_params() -> None:
    arch = FCNArchitecture(FCNArchitecture.Params(depth=3, width=5, in_channels=3, classes=4))
    model = arch.build()
    assert isinstance(model, FCN)
    assert len(model.blocks) == 3
    assert model.blocks[0].conv.in_channels == 3
    assert model.head.out_channels == 4
    assert arch.in_channels() == 3


def test_params_defaults() -> None:
    params = FCNArchitecture.Params(depth=1)
    assert (params.width, params.kernel_size, params.in_channels, params.classes) == (64, 3, 1, 2)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({}, "depth"),
        ({"depth": 0}, "depth"),
        ({"depth": 2, "width": 0}, "width"),
        ({"depth": 2, "kernel_size": 4}, "kernel_size must be odd"),
        ({"depth": 2, "kernel_size": 0}, "kernel_size"),
        ({"depth": 2, "colour": "red"}, "colour"),
    ],
)
def test_invalid_params_are_refused(values: dict, fragment: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=fragment):
        FCNArchitecture.Params.model_validate(values)


def test_found_through_the_registry() -> None:
    entry = load_registry().get("architecture", "fcn")
    assert entry.cls is FCNArchitecture
    assert entry.provider.distribution == "mapsim"
    arch = load_registry().create("architecture", "fcn", {"depth": 2, "width": 4})
    assert isinstance(arch.build(), FCN)


def _with_trained_like_batch_norms(model: FCN, seed: int = 0) -> FCN:
    generator = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        n = block.bn.num_features
        block.bn.running_mean.copy_(torch.randn(n, generator=generator))
        block.bn.running_var.copy_(torch.rand(n, generator=generator) * 3 + 0.05)
        block.bn.weight.data.copy_(torch.randn(n, generator=generator))
        block.bn.bias.data.copy_(torch.randn(n, generator=generator))
    return model.eval()


def test_folding_batch_norms_keeps_every_captured_output() -> None:
    torch.manual_seed(0)
    model = _with_trained_like_batch_norms(FCN(depth=3, width=8, kernel_size=5))
    x = torch.randn(1, 1, 24, 30)
    paths = ["blocks.0", "blocks.1.conv", "blocks.2", "head"]

    def outputs(module):
        captured = {}
        handles = [module.get_submodule(p).register_forward_hook(
            lambda m, i, o, p=p: captured.__setitem__(p, o.double())) for p in paths]
        with torch.no_grad():
            module(x)
        for handle in handles:
            handle.remove()
        return captured

    before = outputs(model)
    # blocks.1 keeps its batch norm: its conv output is captured
    assert model.fuse_for_inference(paths) == ["blocks.0", "blocks.2"]
    assert isinstance(model.blocks[0].bn, torch.nn.Identity)
    assert isinstance(model.blocks[1].bn, torch.nn.BatchNorm2d)
    after = outputs(model)
    for path in paths:
        scale = before[path].abs().max()
        assert (after[path] - before[path]).abs().max() <= 1e-5 * scale, path
    assert model.fuse_for_inference(paths) == []  # nothing left to fold


def test_folding_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        FCN(depth=1).train().fuse_for_inference([])


def _conv_float64(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Size-preserving 2-D cross-correlation (what nn.Conv2d computes), float64 numpy.
    x: (C, H, W), weight: (O, C, k, k), bias: (O,)."""
    pad = weight.shape[-1] // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, weight.shape[-2:], axis=(1, 2))
    return np.einsum("chwij,ocij->ohw", windows, weight) + bias[:, None, None]


def test_folding_matches_a_float64_reference_with_variances_near_eps() -> None:
    """Folded weights w * gamma / sqrt(var + eps) and bias (b - mean) * gamma / sqrt(var + eps)
    + beta, against numpy float64, with running variances of the order of eps (1e-5): there
    eps inside or outside the square root differs by percents, and per-channel scale errors
    are visible here (Pearson tables would not show them)."""
    eps = 1e-5
    generator = torch.Generator().manual_seed(7)
    model = FCN(depth=2, width=5, kernel_size=3, in_channels=2, conv="direct")
    reference = []  # float64 copies of every parameter before folding
    for block in model.blocks:
        n = block.bn.num_features
        assert block.bn.eps == eps
        block.conv.weight.data.copy_(torch.randn(block.conv.weight.shape, generator=generator))
        block.conv.bias.data.copy_(torch.randn(n, generator=generator))
        block.bn.running_var.copy_(10 ** (torch.rand(n, generator=generator) * 2 - 6))  # 1e-6..1e-4
        block.bn.running_mean.copy_(torch.randn(n, generator=generator))
        block.bn.weight.data.copy_(torch.randn(n, generator=generator))
        block.bn.bias.data.copy_(torch.randn(n, generator=generator))
        reference.append({name: t.detach().double().numpy().copy() for name, t in {
            "w": block.conv.weight, "b": block.conv.bias, "mean": block.bn.running_mean,
            "var": block.bn.running_var, "gamma": block.bn.weight, "beta": block.bn.bias,
        }.items()})
    head_w = model.head.weight.detach().double().numpy().copy()
    head_b = model.head.bias.detach().double().numpy().copy()
    model.eval()
    assert model.fuse_for_inference([]) == ["blocks.0", "blocks.1"]

    for block, p in zip(model.blocks, reference):
        scale = p["gamma"] / np.sqrt(p["var"] + eps)
        want_w = p["w"] * scale[:, None, None, None]
        want_b = (p["b"] - p["mean"]) * scale + p["beta"]
        # float32 storage of a float64 result: within one rounding (2**-24 relative)
        np.testing.assert_allclose(block.conv.weight.detach().double().numpy(), want_w, rtol=1e-7, atol=0)
        np.testing.assert_allclose(block.conv.bias.detach().double().numpy(), want_b, rtol=1e-7, atol=0)

    x = torch.randn(1, 2, 9, 11, generator=generator)
    with torch.no_grad():
        got = model(x)[0].double().numpy()
    # float64 reference of the unfolded network: conv -> batch norm (eval) -> ReLU, then head
    h = x[0].double().numpy()
    for p in reference:
        h = _conv_float64(h, p["w"], p["b"])
        h = (h - p["mean"][:, None, None]) / np.sqrt(p["var"][:, None, None] + eps)
        h = np.maximum(h * p["gamma"][:, None, None] + p["beta"][:, None, None], 0.0)
    want = np.einsum("chw,oc->ohw", h, head_w[:, :, 0, 0]) + head_b[:, None, None]
    # float32 forward pass: errors of a few ulps of the largest magnitudes involved
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
