"""The one product per image: moments and Pearson against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import relu_like_maps

from mapsim.engine.moments import Moments, compute_moments
from mapsim.plugins.metrics.pearson import Pearson, PearsonParams


def reference_comoment(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    zc = z - z.mean(axis=1, keepdims=True)
    return zc @ zc.T


def pearson_matrix(z: np.ndarray, absolute: bool = True) -> np.ndarray:
    m = compute_moments(torch.from_numpy(z))
    metric = Pearson(PearsonParams(absolute=absolute))
    every = slice(0, z.shape[0])
    return metric.from_moments(m, every, every).numpy()


def test_comoment_matches_float64(rng):
    z = rng.standard_normal((20, 5000)).astype(np.float32)
    m = compute_moments(torch.from_numpy(z))
    assert m.n == 5000
    np.testing.assert_allclose(m.mean.numpy(), z.astype(np.float64).mean(axis=1), atol=1e-12)
    ref = reference_comoment(z)
    assert np.abs(m.comoment.numpy() - ref).max() <= 1e-6 * np.abs(ref).max()
    assert m.comoment.dtype == torch.float64


@pytest.mark.parametrize("kind", ["random", "relu", "large-mean"])
def test_pearson_matches_numpy_corrcoef(rng, kind):
    if kind == "random":
        z = rng.standard_normal((30, 4096)).astype(np.float32)
    elif kind == "relu":
        z = relu_like_maps(rng, 30, 64, 64).reshape(30, -1)
    else:  # large mean, small spread: naive uncentred sums lose every digit here
        z = (1000.0 + 0.01 * rng.standard_normal((30, 4096))).astype(np.float32)
    r = pearson_matrix(z, absolute=False)
    ref = np.corrcoef(z.astype(np.float64))
    assert np.abs(r - ref).max() < 1e-5
    np.testing.assert_allclose(pearson_matrix(z), np.abs(ref), atol=1e-5)


def test_pearson_is_exact_on_a_hand_worked_case():
    # x = (1,2,3,4); y = 2x + 1 -> r = 1; w = (4,3,2,1)... reversed -> r = -1;
    # v = (1,0,0,1): cov(x, v) = 0 -> r = 0
    z = np.array([[1, 2, 3, 4], [3, 5, 7, 9], [4, 3, 2, 1], [1, 0, 0, 1]], dtype=np.float32)
    r = pearson_matrix(z, absolute=False)
    np.testing.assert_allclose(r[0, 1], 1.0, atol=1e-12)
    np.testing.assert_allclose(r[0, 2], -1.0, atol=1e-12)
    np.testing.assert_allclose(r[0, 3], 0.0, atol=1e-12)
    assert pearson_matrix(z)[0, 2] == pytest.approx(1.0)


def test_pearson_over_a_million_pixels_stays_within_1e_5(rng):
    z = relu_like_maps(rng, 8, 1024, 1024).reshape(8, -1)
    ref = np.corrcoef(z.astype(np.float64))
    assert np.abs(pearson_matrix(z, absolute=False) - ref).max() < 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096, None])
def test_chunking_does_not_change_the_result(rng, chunk):
    z = rng.standard_normal((6, 1000)).astype(np.float32) + 5.0
    m = compute_moments(torch.from_numpy(z), chunk_pixels=chunk)
    ref = reference_comoment(z)
    assert np.abs(m.comoment.numpy() - ref).max() <= 1e-6 * np.abs(ref).max()


def test_chan_merge_equals_moments_of_the_union(rng):
    a = rng.standard_normal((5, 300)).astype(np.float32) + 3.0
    b = 2.0 * rng.standard_normal((5, 700)).astype(np.float32) - 1.0
    merged = compute_moments(torch.from_numpy(a)).merge(compute_moments(torch.from_numpy(b)))
    union = np.concatenate([a, b], axis=1)
    assert merged.n == 1000
    np.testing.assert_allclose(merged.mean.numpy(), union.astype(np.float64).mean(1), atol=1e-12)
    ref = reference_comoment(union)
    assert np.abs(merged.comoment.numpy() - ref).max() <= 1e-6 * np.abs(ref).max()


def test_products_give_uncentred_sums(rng):
    z = rng.standard_normal((4, 200)).astype(np.float32) + 2.0
    m = compute_moments(torch.from_numpy(z))
    z64 = z.astype(np.float64)
    ref = z64 @ z64.T
    assert np.abs(m.products().numpy() - ref).max() <= 1e-6 * np.abs(ref).max()


def test_constant_maps_have_exactly_zero_variance(rng):
    z = rng.standard_normal((4, 999)).astype(np.float32)
    z[1] = 0.0
    z[2] = 3.7  # a constant that is not zero (e.g. a bias after BatchNorm)
    m = compute_moments(torch.from_numpy(z))
    dead = Pearson().dead(m, 1e-10).numpy()
    assert dead.tolist() == [False, True, True, False]
    r = Pearson().from_moments(m, slice(0, 4), slice(0, 4)).numpy()
    assert np.isnan(r[1]).all() and np.isnan(r[:, 2]).all()
    assert not np.isnan(r[np.ix_([0, 3], [0, 3])]).any()


def test_generic_path_agrees_with_moments_path(rng):
    z = relu_like_maps(rng, 12, 32, 32).reshape(12, -1)
    m = compute_moments(torch.from_numpy(z))
    metric = Pearson()
    via_moments = metric.from_moments(m, slice(0, 5), slice(5, 12))
    via_maps = metric.from_maps(torch.from_numpy(z[:5]), torch.from_numpy(z[5:]))
    np.testing.assert_allclose(via_moments.numpy(), via_maps.numpy(), atol=1e-6)


def test_pearson_is_invariant_to_scale_and_shift(rng):
    z = rng.standard_normal((6, 500)).astype(np.float32)
    moved = z.copy()
    moved[2] = 4.0 * z[2] + 10.0
    moved[3] = -0.5 * z[3]
    np.testing.assert_allclose(pearson_matrix(moved), pearson_matrix(z), atol=1e-5)


def test_moments_reject_bad_shapes():
    with pytest.raises(ValueError, match="zero pixels"):
        compute_moments(torch.zeros(3, 0))
    with pytest.raises(ValueError, match=r"\(C, P\)"):
        compute_moments(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="cannot merge"):
        Moments(1, torch.zeros(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
                ).merge(Moments(1, torch.zeros(3, dtype=torch.float64),
                                torch.zeros(3, 3, dtype=torch.float64)))
