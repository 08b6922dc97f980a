"""The built-in ``unet`` architecture: pinned module paths and shapes, the forward pass
against a functional re-implementation with the same weights, clear refusals, a tiny CPU
training run through ``mapsim train`` and an encoder-vs-decoder comparison (the bundled U-Net
and examples/unet.yaml: tests/test_unet_pretrained.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from mapsim.errors import ExtractionError, SpecError
from mapsim.models.build import build_model
from mapsim.plugins.hooks import HooksExtractor
from mapsim.registry import load_registry
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec
from mapsim.training import train, validate_train_spec


def unet(**params):
    arch = load_registry().create("architecture", "unet", params)
    return build_model("u", architecture=arch, seed=0).module.eval()


def test_module_paths_are_stable():
    names = [n for n, _ in unet(depth=2, width=4).named_modules() if n and n.count(".") <= 1]
    assert names == [
        "encoder", "encoder.0", "encoder.1", "down", "down.0", "down.1", "bottleneck",
        "bottleneck.0", "bottleneck.1", "up", "up.0", "up.1", "decoder", "decoder.0",
        "decoder.1", "head"]
    model = unet(depth=2, width=4)
    assert [n for n, _ in model.named_modules() if n.startswith("encoder.0.0")] == [
        "encoder.0.0", "encoder.0.0.conv", "encoder.0.0.bn", "encoder.0.0.relu"]
    assert [n for n, _ in unet(depth=1, width=2, upsampling="transposed").named_modules()
            if n.startswith("up.")] == ["up.0"]


@pytest.mark.parametrize("depth", [1, 3])
def test_shapes_follow_the_documented_rule(depth):
    width, size = 3, 32
    paths = ([f"encoder.{i}" for i in range(depth)] + [f"down.{i}" for i in range(depth)]
             + ["bottleneck"] + [f"up.{i}" for i in range(depth)]
             + [f"decoder.{i}" for i in range(depth)] + ["head"])
    got = HooksExtractor().extract(unet(depth=depth, width=width), paths,
                                   torch.randn(1, 1, size, size))
    for i in range(depth):
        level = (1, width * 2 ** i, size // 2 ** i, size // 2 ** i)
        assert tuple(got[f"encoder.{i}"].shape) == level
        assert tuple(got[f"decoder.{i}"].shape) == level
        assert tuple(got[f"up.{i}"].shape) == level
        assert tuple(got[f"down.{i}"].shape) == (1, width * 2 ** i, size // 2 ** (i + 1),
                                                 size // 2 ** (i + 1))
    deep = size // 2 ** depth
    assert tuple(got["bottleneck"].shape) == (1, width * 2 ** depth, deep, deep)
    assert tuple(got["head"].shape) == (1, 2, size, size)


def _block(block, x):
    for unit in block:
        x = F.conv2d(x, unit.conv.weight, unit.conv.bias, padding=1)
        bn = unit.bn
        x = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None]
                                                              + bn.eps)
        x = torch.relu(x * bn.weight[:, None, None] + bn.bias[:, None, None])
    return x


@pytest.mark.parametrize("upsampling", ["bilinear", "transposed"])
def test_forward_equals_a_functional_reimplementation(upsampling):
    model = unet(depth=2, width=4, upsampling=upsampling)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 1, 16, 24)
    with torch.no_grad():
        e0 = _block(model.encoder[0], x)
        e1 = _block(model.encoder[1], F.max_pool2d(e0, 2))
        b = _block(model.bottleneck, F.max_pool2d(e1, 2))

        def up(i, t):
            if upsampling == "bilinear":
                t = F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
                return F.conv2d(t, model.up[i].conv.weight, model.up[i].conv.bias)
            return F.conv_transpose2d(t, model.up[i].weight, model.up[i].bias, stride=2)

        d1 = _block(model.decoder[1], torch.cat([up(1, b), e1], 1))
        d0 = _block(model.decoder[0], torch.cat([up(0, d1), e0], 1))
        want = F.conv2d(d0, model.head.weight, model.head.bias)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_refusals_are_clear():
    with pytest.raises(ExtractionError, match=r"divisible by 4, got \(18, 16\)"):
        HooksExtractor().extract(unet(depth=2, width=2), ["head"], torch.randn(1, 1, 18, 16))
    with pytest.raises(Exception, match="upsampling"):
        unet(depth=2, upsampling="nearest")


def test_trains_with_mapsim_train_on_the_cpu(tmp_path):
    rng = np.random.RandomState(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(6):
        label = ndimage.gaussian_filter(rng.randn(16, 16), 2) > 0.1
        np.save(tmp_path / "images" / f"im{i}.npy", (label + 0.3 * rng.randn(16, 16))
                .astype(np.float32))
        np.save(tmp_path / "labels" / f"im{i}.npy", label)
    spec = validate_train_spec({
        "name": "tiny-unet",
        "model": {"architecture": {"name": "unet", "depth": 2, "width": 4}},
        "data": {"name": "files", "paths": "images", "labels": "labels"},
        "epochs": 4, "batch_size": 2, "device": "cpu",
        "optimizer": {"name": "adam", "lr": 0.01},
    })
    result = train(spec, base_dir=tmp_path, progress=False)
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    arch = load_registry().create("architecture", "unet", {"depth": 2, "width": 4})
    model = build_model("m", architecture=arch,
                        weights=tmp_path / "runs" / "tiny-unet" / "best.safetensors")
    assert model.source["weights"]["source"] == "file"


def test_encoder_against_decoder_in_a_run(tmp_path):
    from skimage.io import imsave

    yy, xx = np.mgrid[0:32, 0:32]
    imsave(tmp_path / "img.png", (128 + 90 * np.sin(xx / 4.0 + yy / 6.0)).astype(np.uint8),
           check_contrast=False)
    base = {"name": "u", "models": {"u": {"architecture": {"name": "unet", "depth": 2,
                                                           "width": 4}, "seed": 1}},
            "images": str(tmp_path / "img.png"), "aggregators": ["max"]}
    same = validate_spec(base | {"layers": {"u": ["encoder.0", "decoder.0"]}})
    result = run(same, base_dir=tmp_path, out_dir=tmp_path / "same")
    best = pd.read_csv(result.out_dir / "max.csv")
    assert set(best.layer_b) == {"encoder.0", "decoder.0"} and "aligned" not in best
    levels = validate_spec(base | {"layers": {"u": ["encoder.0", "bottleneck"]}})
    with pytest.raises(Exception, match="engine.align"):
        run(levels, base_dir=tmp_path, out_dir=tmp_path / "refused")
    aligned = validate_spec(base | {"layers": {"u": ["encoder.0", "bottleneck"]},
                                    "engine": {"align": "smaller"}})
    result = run(aligned, base_dir=tmp_path, out_dir=tmp_path / "aligned")
    assert set(pd.read_csv(result.out_dir / "max.csv")["aligned"]) == {"smaller/area 8x8"}
    with pytest.raises(SpecError, match="depth"):
        validate_spec(base | {"models": {"u": {"architecture": {"name": "unet", "depth": 0}}},
                             "layers": {"u": ["head"]}})

