"""Compensation and structural removal (mapsim.pruning), against float64 numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mapsim.engine.moments import compute_moments
from mapsim.pruning import surgery
from mapsim.pruning.compensate import affine_fit, border_error, fold


def np_conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Zero-padded 'same' cross-correlation in float64 by explicit taps: x (C, H, W)."""
    c_out, c_in, k, _ = w.shape
    p = k // 2
    h, wd = x.shape[1:]
    xp = np.zeros((c_in, h + 2 * p, wd + 2 * p))
    xp[:, p:p + h, p:p + wd] = x
    out = np.zeros((c_out, h, wd)) + bias[:, None, None]
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("oc,chw->ohw", w[:, :, dy, dx], xp[:, dy:dy + h, dx:dx + wd])
    return out


def moments_of(maps: np.ndarray):
    return compute_moments(torch.from_numpy(maps.reshape(maps.shape[0], -1)).float())


def setup(noise: float, a: float = 0.7, b: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    maps = np.maximum(rng.normal(size=(4, 10, 12)), 0).astype(np.float32)
    maps[2] = (a * maps[0] + b + noise * rng.normal(size=(10, 12))).astype(np.float32)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    return maps, conv


def compensated_output(maps, conv, partners):
    original_w = conv.weight.detach().double().numpy().copy()
    original_b = conv.bias.detach().double().numpy().copy()
    record = fold(conv, partners, moments_of(maps))
    keep = [k for k in range(4) if k not in partners]
    w = conv.weight.detach()[:, keep]
    out = torch.nn.functional.conv2d(torch.from_numpy(maps[keep])[None], w, conv.bias.detach(),
                                     padding=1)[0].double().numpy()
    ref = np_conv(maps.astype(np.float64), original_w, original_b)
    return out, ref, record, original_w


def test_affine_fit_matches_least_squares():
    maps, _ = setup(noise=0.2)
    a, b = affine_fit(moments_of(maps), 0, 2)
    ref_a, ref_b = np.polyfit(maps[0].ravel().astype(np.float64),
                              maps[2].ravel().astype(np.float64), 1)
    assert a == pytest.approx(ref_a, rel=1e-5) and b == pytest.approx(ref_b, abs=1e-5)


def test_constant_partner_gives_mean():
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[1] = np.arange(16).reshape(4, 4)
    assert affine_fit(moments_of(maps), 0, 1) == pytest.approx((0.0, 7.5))


def test_exact_relation_leaves_interior_unchanged_and_border_as_documented():
    maps, conv = setup(noise=0.0)
    out, ref, record, w = compensated_output(maps, conv, {2: 0})
    assert record[2]["a"] == pytest.approx(0.7, rel=1e-5)
    assert record[2]["b"] == pytest.approx(0.3, abs=1e-5)
    inner = (slice(None), slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(out[inner], ref[inner], atol=2e-5)
    # at the border: b times the taps of W[:, 2] that read the zero padding (by hand)
    outside = np.zeros_like(ref)
    padded = np.pad(np.ones((10, 12)), 1)
    for o in range(3):
        for y in range(10):
            for x in range(12):
                window = padded[y:y + 3, x:x + 3]
                outside[o, y, x] = 0.3 * (w[o, 2] * (1 - window)).sum()
    np.testing.assert_allclose(out - ref, outside, atol=2e-5)
    np.testing.assert_allclose(border_error(torch.from_numpy(w), 2, 0.3, 10, 12, 1).numpy(),
                               outside, atol=1e-12)


def test_without_compensation_output_changes():
    maps, conv = setup(noise=0.0)
    keep = [0, 1, 3]
    out = torch.nn.functional.conv2d(torch.from_numpy(maps[keep])[None],
                                     conv.weight.detach()[:, keep], conv.bias.detach(), padding=1)[0]
    ref = np_conv(maps.astype(np.float64), conv.weight.detach().double().numpy(),
                  conv.bias.detach().double().numpy())
    assert np.abs(out.double().numpy() - ref)[:, 1:-1, 1:-1].max() > 1e-2


def test_approximate_relation_change_is_the_residual_contribution():
    maps, conv = setup(noise=0.05)
    m = maps.astype(np.float64)
    a, b = np.polyfit(m[0].ravel(), m[2].ravel(), 1)
    residual = m[2] - a * m[0] - b
    out, ref, _, w = compensated_output(maps, conv, {2: 0})
    contribution = np_conv(residual[None], w[:, 2:3], np.zeros(3))
    expected = -contribution + border_error(torch.from_numpy(w), 2, b, 10, 12, 1).numpy()
    np.testing.assert_allclose(out - ref, expected, atol=5e-5)
    assert np.abs(contribution).max() > 1e-2  # the residual matters


def test_change_grows_with_one_minus_r():
    changes, gaps = [], []
    for noise in (0.0, 0.01, 0.05, 0.2):
        maps, conv = setup(noise=noise)
        out, ref, _, _ = compensated_output(maps, conv, {2: 0})
        changes.append(np.abs(out - ref)[:, 1:-1, 1:-1].mean())
        gaps.append(1 - abs(np.corrcoef(maps[0].ravel(), maps[2].ravel())[0, 1]))
    assert np.all(np.diff(gaps) > 0) and np.all(np.diff(changes) > 0)


def hand_fcn(kernel: int):
    from mapsim.plugins.fcn import FCN

    torch.manual_seed(0)
    model = FCN(depth=2, width=4, kernel_size=kernel, in_channels=3, conv="direct").eval()
    with torch.no_grad():
        c = model.blocks[0].conv
        c.weight[1] = 2.0 * c.weight[0]  # map 1 = 2 * map 0 (ReLU is positively homogeneous)
        c.bias[1] = 2.0 * c.bias[0]
        c.weight[2] = 0.0  # map 2 = relu(0.5 / sqrt(1 + eps)): a constant
        c.bias[2] = 0.5
    return model


def test_exact_copies_in_a_network_prune_without_change():
    from mapsim.plugins.prune_criteria import CorrelationCompensated
    from mapsim.pruning.prune import prune_model

    model = hand_fcn(kernel=1)
    images = torch.randn(3, 3, 12, 12)
    out = prune_model(model, CorrelationCompensated(CorrelationCompensated.Params(
        threshold=0.999)), images, layers=["blocks.0"])
    assert out.removed == {"blocks.0": [0, 2]}  # of 0 and 2*0, the larger variance stays
    assert out.compensation["blocks.0"][0]["partner"] == 1
    assert out.compensation["blocks.0"][0]["a"] == pytest.approx(0.5, rel=1e-6)
    with torch.no_grad():
        ref = model.double()(images.double())
        got = out.model(images).double()
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)
    uncompensated = hand_fcn(kernel=1)
    surgery.remove_maps(uncompensated, 0, [1, 3])
    with torch.no_grad():
        assert (uncompensated(images).double() - ref).abs().max() > 1e-2


def test_exact_copies_3x3_next_layer_interior_unchanged():
    from mapsim.plugins.prune_criteria import CorrelationCompensated
    from mapsim.pruning.prune import layer_maps, prune_model

    model = hand_fcn(kernel=3)
    images = torch.randn(2, 3, 12, 12)
    out = prune_model(model, CorrelationCompensated(CorrelationCompensated.Params(
        threshold=0.999)), images, layers=["blocks.0"])
    assert out.removed == {"blocks.0": [0, 2]}  # of 0 and 2*0, the larger variance stays

    def pre_relu(m, x):
        seen = []
        h = m.blocks[1].conv.register_forward_hook(lambda _m, _i, o: seen.append(o))
        with torch.no_grad():
            m(x)
        h.remove()
        return seen[0]

    ref = pre_relu(model.double(), images.double())
    got = pre_relu(out.model, images).double()
    np.testing.assert_allclose(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)
    assert layer_maps(out.model, out.model.blocks[0], images).shape[1] == 2


def fcn_params(widths, kernel, classes=2):
    total, c_in = 0, 1
    for w in widths:
        total += c_in * w * kernel * kernel + w + 2 * w
        c_in = w
    return total + c_in * classes + classes


def test_structural_removal_keeps_the_original_channels():
    from mapsim.plugins.fcn import FCN

    torch.manual_seed(1)
    model = FCN(depth=3, width=8, kernel_size=3, conv="direct").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    reference = FCN(depth=3, width=8, kernel_size=3, conv="direct").eval()
    reference.load_state_dict(model.state_dict())
    keeps = {0: [0, 2, 5], 2: [1, 3, 4, 6, 7]}
    for index, keep in keeps.items():
        surgery.remove_maps(model, index, keep)
    assert surgery.parameter_count(model) == fcn_params([3, 8, 5], 3)
    for index, keep in keeps.items():
        new, old = model.blocks[index], reference.blocks[index]
        assert torch.equal(new.conv.weight, old.conv.weight[keep])
        assert torch.equal(new.bn.running_var, old.bn.running_var[keep])
    # same function as the original with the removed maps' outgoing weights zeroed
    with torch.no_grad():
        for index, keep in keeps.items():
            drop = [k for k in range(8) if k not in keep]
            surgery.next_conv(reference, index).weight[:, drop] = 0
        x = torch.randn(2, 1, 16, 16)
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_removing_every_map_is_refused():
    from mapsim.plugins.fcn import FCN

    with pytest.raises(ValueError, match="disconnects"):
        surgery.remove_maps(FCN(depth=2, width=4), 0, [])


def test_non_chain_model_is_refused():
    from mapsim.errors import ModelError

    with pytest.raises(ModelError, match="fcn-shaped"):
        surgery.chain(nn.Sequential(nn.Conv2d(1, 2, 3)))
