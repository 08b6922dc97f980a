"""svcca, pwcca, procrustes, rsa and mutual_knn against independent float64 references.

References are written here from the papers with numpy/scipy (a different route from the
plugins' eigendecompositions and whitening), from scipy's orthogonal Procrustes, from
rsatoolbox where it is installed (and scipy's spearmanr/pearsonr on condensed RDMs always),
and from brute-force neighbour sets; plus hand-worked cases (an invertible mix of a layer has
every canonical correlation 1, a rotation has Procrustes distance 0, k = n - 1 neighbours
always agree). Both computation paths of the moment-based measures are checked: the engine's
moments (compute_moments, as a run computes them) and the maps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr, spearmanr

import mapsim
from mapsim.engine.moments import compute_moments
from mapsim.registry import load_registry

REGISTRY = load_registry()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _layers(seed: int = 0, n: int = 400, ca: int = 7, cb: int = 5):
    """Two correlated layers as (C, P) float32 tensors (P = n pixels)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 4))
    a = base @ rng.standard_normal((4, ca)) + 0.5 * rng.standard_normal((n, ca)) + 3.0
    b = base @ rng.standard_normal((4, cb)) + 0.8 * rng.standard_normal((n, cb)) - 1.0
    return (torch.from_numpy(a.T.astype(np.float32)), torch.from_numpy(b.T.astype(np.float32)))


#: the moments come from float32 chunk products (the engine's precision policy): the
#: moments path is held to the contract's 1e-5, the float64 maps path to 1e-9
TOLERANCES = (1e-5, 1e-9)


def _both_paths(metric, x, y):
    """(from the engine's moments, from the maps)."""
    moments = compute_moments(torch.cat([x, y]))
    a, b = slice(0, len(x)), slice(len(x), len(x) + len(y))
    return metric.from_moments(moments, a, b), metric.from_maps(x, y)


def _centred(t: torch.Tensor) -> np.ndarray:
    m = t.numpy().astype(np.float64).T
    return m - m.mean(axis=0)


# --------------------------------------------------------------------------- CCA references
def _svd_reduce(x: np.ndarray, keep: float) -> np.ndarray:
    """Raghu et al.: project onto the top singular directions explaining ``keep`` of the
    variance (x centred, samples x neurons)."""
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(share, keep) + 1) if keep < 1 else len(s)
    return u[:, :k] * s[:k]


def _cca_reference(x: np.ndarray, y: np.ndarray):
    """Canonical correlations and x's canonical weights, as the eigenproblem
    Sxx^-1 Sxy Syy^-1 Syx w = rho^2 w (Hotelling 1936)."""
    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y
    m = np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)
    rho2, w = np.linalg.eig(m)
    order = np.argsort(-rho2.real)[: min(x.shape[1], y.shape[1])]
    return np.sqrt(np.clip(rho2.real[order], 0, 1)), w.real[:, order]


def _svcca_reference(x, y, keep=0.99) -> float:
    rho, _ = _cca_reference(_svd_reduce(x, keep), _svd_reduce(y, keep))
    return float(rho.mean())


def _pwcca_reference(x, y) -> float:
    """Morcos et al. (their compute_pwcca, with centred activations): weights from the layer
    with fewer neurons, alpha_i = sum_j |<h_i, x_j>| over the orthonormalised variates h."""
    if x.shape[1] > y.shape[1]:
        x, y = y, x
    rho, w = _cca_reference(x, y)
    h, _ = np.linalg.qr(x @ w)
    alpha = np.abs(h.T @ x).sum(axis=1)
    return float(np.sum(alpha / alpha.sum() * rho))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svcca_equals_the_paper_reference(seed):
    x, y = _layers(seed)
    expected = _svcca_reference(_centred(x), _centred(y))
    metric = REGISTRY.create("metric", "svcca", {})
    for value, tolerance in zip(_both_paths(metric, x, y), TOLERANCES):
        assert value == pytest.approx(expected, abs=tolerance)
    for keep in (0.8, 1.0):
        other = REGISTRY.create("metric", "svcca", {"variance": keep})
        expected_other = _svcca_reference(_centred(x), _centred(y), keep=keep)
        for value, tolerance in zip(_both_paths(other, x, y), TOLERANCES):
            assert value == pytest.approx(expected_other, abs=tolerance)
    # the truncation matters on these layers
    assert not math.isclose(_svcca_reference(_centred(x), _centred(y), keep=0.8),
                            _svcca_reference(_centred(x), _centred(y), keep=1.0), abs_tol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pwcca_equals_the_paper_reference(seed):
    x, y = _layers(seed)
    expected = _pwcca_reference(_centred(x), _centred(y))
    metric = REGISTRY.create("metric", "pwcca", {})
    for value, tolerance in zip(_both_paths(metric, x, y), TOLERANCES):
        assert value == pytest.approx(expected, abs=tolerance)
    rho, _ = _cca_reference(_centred(x), _centred(y))
    assert not math.isclose(expected, rho.mean(), abs_tol=1e-3)  # the weights matter here


def test_an_invertible_mix_of_a_layer_has_every_canonical_correlation_one():
    x, _ = _layers(3)
    rng = np.random.default_rng(3)  # well conditioned (singular values 1 to 3): float32 maps
    q1, q2 = (np.linalg.qr(rng.standard_normal((7, 7)))[0] for _ in range(2))
    mix = torch.from_numpy((q1 @ np.diag(np.linspace(1, 3, 7)) @ q2).astype(np.float32))
    for name in ("svcca", "pwcca"):
        metric = REGISTRY.create("metric", name, {"variance": 1.0})
        for value in _both_paths(metric, x, mix @ x + 2.0):
            assert value == pytest.approx(1.0, abs=1e-5)


def test_cca_reports_a_constant_layer_and_too_few_pixels():
    x, y = _layers(4, n=10)
    metric = REGISTRY.create("metric", "svcca", {"variance": 1.0})
    for value in _both_paths(metric, x, y):  # 10 pixels, 7 + 5 directions
        assert isinstance(value, mapsim.Undefined) and "too few samples: n=10" in value.reason
    for value in _both_paths(metric, torch.ones_like(x), y):
        assert isinstance(value, mapsim.Undefined) and "constant" in value.reason


# --------------------------------------------------------------------------- Procrustes
def _procrustes_reference(x: np.ndarray, y: np.ndarray) -> float:
    """min_Q ||X Q - Y||_F after centring, unit Frobenius norm and zero padding (scipy)."""
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    width = max(x.shape[1], y.shape[1])
    x = np.pad(x, ((0, 0), (0, width - x.shape[1])))
    y = np.pad(y, ((0, 0), (0, width - y.shape[1])))
    q, _ = scipy.linalg.orthogonal_procrustes(x, y)
    return float(np.linalg.norm(x @ q - y))


@pytest.mark.parametrize("seed", [0, 1])
def test_procrustes_equals_the_closed_form(seed):
    x, y = _layers(seed)
    expected = _procrustes_reference(_centred(x), _centred(y))
    distance = REGISTRY.create("metric", "procrustes", {})
    angle = REGISTRY.create("metric", "procrustes", {"angular": True})
    for value, tolerance in zip(_both_paths(distance, x, y), TOLERANCES):
        assert value == pytest.approx(expected, abs=tolerance)
    for value, tolerance in zip(_both_paths(angle, x, y), TOLERANCES):
        # ||XQ - Y||^2 = 2 - 2 cos(angle)
        assert value == pytest.approx(math.acos(1 - expected**2 / 2), abs=tolerance)


def test_a_rotated_and_scaled_layer_is_at_procrustes_distance_zero():
    x, _ = _layers(5)
    q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((7, 7)))
    moved = 3.0 * torch.from_numpy(q.astype(np.float32)) @ x - 4.0
    metric = REGISTRY.create("metric", "procrustes", {})
    for value in _both_paths(metric, x, moved):
        assert value == pytest.approx(0.0, abs=2e-3)  # sqrt of float32 rounding
    assert metric.from_maps(x, moved) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- RSA
def _pixels(seed: int = 0):
    x, y = _layers(seed, n=60)
    return x, y, x.numpy().T.astype(np.float64), y.numpy().T.astype(np.float64)


@pytest.mark.parametrize("dissimilarity, compare", [
    ("euclidean", "spearman"), ("euclidean", "pearson"),
    ("correlation", "spearman"), ("correlation", "pearson"),
])
def test_rsa_equals_scipy_on_condensed_rdms(dissimilarity, compare):
    x, y, a, b = _pixels(1)
    metric = REGISTRY.create("metric", "rsa", {"dissimilarity": dissimilarity,
                                               "compare": compare})
    kind = "sqeuclidean" if dissimilarity == "euclidean" else "correlation"
    ra, rb = pdist(a, kind), pdist(b, kind)
    expected = (spearmanr(ra, rb) if compare == "spearman" else pearsonr(ra, rb))[0]
    assert metric.from_maps(x, y) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("method, compare", [("euclidean", "spearman"),
                                             ("correlation", "corr")])
def test_rsa_equals_rsatoolbox(method, compare):
    rsatoolbox = pytest.importorskip("rsatoolbox")
    from rsatoolbox.rdm import calc_rdm, compare as compare_rdms

    x, y, a, b = _pixels(2)
    rdms = [calc_rdm(rsatoolbox.data.Dataset(m), method=method) for m in (a, b)]
    expected = float(compare_rdms(rdms[0], rdms[1], method=compare)[0, 0])
    metric = REGISTRY.create("metric", "rsa", {
        "dissimilarity": method, "compare": "spearman" if compare == "spearman" else "pearson"})
    assert metric.from_maps(x, y) == pytest.approx(expected, abs=1e-9)


def test_rsa_subsamples_the_same_positions_in_both_layers():
    x, y, a, b = _pixels(3)
    metric = REGISTRY.create("metric", "rsa", {"subsample": 20, "seed": 4})
    keep = np.sort(torch.randperm(60, generator=torch.Generator().manual_seed(4))[:20].numpy())
    expected = spearmanr(pdist(a[keep], "sqeuclidean"), pdist(b[keep], "sqeuclidean"))[0]
    assert metric.from_maps(x, y) == pytest.approx(expected, abs=1e-9)
    # the same layer against itself at the same positions: 1
    assert metric.from_maps(x, x) == pytest.approx(1.0, abs=1e-12)


def _images(seed: int, n_images: int = 6):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_images, 3, 8, 8)).astype(np.float32),
            rng.standard_normal((n_images, 2, 8, 8)).astype(np.float32))


def _avg_pool(maps: np.ndarray, size: int) -> np.ndarray:
    """(images, C, H, W) -> (images, C * size * size) by block means (H, W divisible)."""
    n, c, h, w = maps.shape
    blocks = maps.astype(np.float64).reshape(n, c, size, h // size, size, w // size)
    return blocks.mean(axis=(3, 5)).reshape(n, -1)


def _across_images(metric, x, y, cuts=()):
    metric.start_blocks()
    merged = type(metric)(metric.params)
    bounds = [0, *cuts, len(x)]
    for start, stop in zip(bounds, bounds[1:]):
        for index in range(start, stop):
            metric.update(f"i{index}", {"a": {"L": torch.from_numpy(x[index])},
                                        "b": {"M": torch.from_numpy(y[index])}})
        merged.add_block_state(*metric.block_state())
    return merged.finish("a", "b")[("L", "M")]


def test_rsa_over_images_equals_scipy_on_pooled_features():
    x, y = _images(6)
    metric = REGISTRY.create("metric", "rsa", {"samples": "images", "size": 4})
    assert isinstance(metric, mapsim.ImagesMetric)
    a, b = _avg_pool(x, 4), _avg_pool(y, 4)
    expected = spearmanr(pdist(a, "sqeuclidean"), pdist(b, "sqeuclidean"))[0]
    assert _across_images(metric, x, y, cuts=(2, 5)) == pytest.approx(expected, abs=1e-9)


def test_rsa_reports_too_few_samples():
    x, y = _images(7, n_images=2)
    metric = REGISTRY.create("metric", "rsa", {"samples": "images", "size": 2})
    value = _across_images(metric, x, y)
    assert isinstance(value, mapsim.Undefined) and "n=2 < 3" in value.reason


# --------------------------------------------------------------------------- mutual k-NN
def _knn_reference(a: np.ndarray, b: np.ndarray, k: int, cosine: bool = False) -> float:
    """Brute force: each sample's k nearest others in each layer, by a Python loop."""
    def near(m, i):
        if cosine:
            unit = m / np.linalg.norm(m, axis=1, keepdims=True)
            d = 1 - unit @ unit[i]
        else:
            d = np.linalg.norm(m - m[i], axis=1)
        order = [j for j in np.argsort(d) if j != i]
        return set(order[:k])

    return float(np.mean([len(near(a, i) & near(b, i)) / k for i in range(len(a))]))


@pytest.mark.parametrize("k, distance", [(1, "euclidean"), (5, "euclidean"), (5, "cosine")])
def test_mutual_knn_equals_brute_force(k, distance):
    x, y, a, b = _pixels(4)
    metric = REGISTRY.create("metric", "mutual_knn", {"k": k, "distance": distance})
    expected = _knn_reference(a, b, k, cosine=distance == "cosine")
    assert 0.0 < expected < 1.0
    assert metric.from_maps(x, y) == pytest.approx(expected, abs=1e-12)


def test_all_other_samples_as_neighbours_always_agree():
    x, y, _, _ = _pixels(5)
    metric = REGISTRY.create("metric", "mutual_knn", {"k": 59})
    assert metric.from_maps(x, y) == 1.0
    short = REGISTRY.create("metric", "mutual_knn", {"k": 60}).from_maps(x, y)
    assert isinstance(short, mapsim.Undefined) and "n=60 <= k=60" in short.reason


def test_mutual_knn_over_images_equals_brute_force_on_pooled_features():
    x, y = _images(8, n_images=9)
    metric = REGISTRY.create("metric", "mutual_knn", {"samples": "images", "k": 3, "size": 2})
    expected = _knn_reference(_avg_pool(x, 2), _avg_pool(y, 2), 3)
    assert _across_images(metric, x, y, cuts=(4,)) == pytest.approx(expected, abs=1e-12)


def test_parameters_of_the_other_kind_of_samples_are_spec_errors():
    with pytest.raises(Exception, match="'size' only applies to samples: images"):
        REGISTRY.create("metric", "rsa", {"size": 4})
    with pytest.raises(Exception, match="'subsample' only applies to samples: pixels"):
        REGISTRY.create("metric", "mutual_knn", {"samples": "images", "subsample": 10})


# --------------------------------------------------------------------------- the example run
def test_the_measures_example_runs_every_new_measure(tmp_path):
    result = mapsim.run(mapsim.load_spec(EXAMPLES / "measures.yaml"), out=tmp_path / "m")
    layers = pd.read_csv(result.dir / "layer_similarity.csv")
    names = set(layers["metric"])
    assert {"svcca", "pwcca", "procrustes", "procrustes-angle", "rsa", "rsa-images",
            "mutual_knn", "knn-images"} <= names
    assert layers["value"].notna().all()
    within = layers[(layers.model_a == layers.model_b) & (layers.layer_a == layers.layer_b)]
    for name, best in (("svcca", 1.0), ("pwcca", 1.0), ("procrustes", 0.0), ("rsa", 1.0)):
        assert within[within.metric == name]["value"].to_numpy() == pytest.approx(best, abs=1e-3)
    pooled = set(pd.read_csv(result.dir / "pooled" / "layer_similarity.csv")["metric"])
    assert {"svcca", "pwcca", "procrustes"} <= pooled  # moment-based: pooled too
    assert (result.dir / "match.csv").exists() and (result.dir / "match_layers_summary.csv"
                                                     ).exists()
