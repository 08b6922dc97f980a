"""The permutation p-value of ``cka`` over images (``samples: images``, ``permutations``):
against an independent float64 numpy computation of the same permutations, calibrated under
the null, at its minimum for a planted relation, the same in one pass and in blocks and
processes, and carried into ``layer_similarity.csv``'s ``p`` column."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_cka_minibatch import _unbiased  # Song et al.'s unbiased HSIC in float64

from mapsim.plugins.metrics.cka import CKA, CKAParams
from mapsim.types import PValued


def _perms(seed: int, batch: int, n: int, count: int) -> np.ndarray:
    """The documented permutations, re-derived: numpy's default generator seeded with
    [seed, batch], each row 0..n-1 permuted independently (Generator.permuted)."""
    rng = np.random.default_rng([seed, batch])
    return rng.permuted(np.tile(np.arange(n), (count, 1)), axis=1)


def reference_p(xs: np.ndarray, ys: np.ndarray, size: int, count: int, seed: int
                ) -> tuple[float, float]:
    """(CKA, p): minibatch CKA over batches of ``size`` (n a multiple of size here) and
    p = (1 + #{CKA_r >= CKA}) / (1 + R), CKA_r with y's images permuted in every batch."""
    fx = xs.reshape(len(xs), -1).astype(np.float64)
    fy = ys.reshape(len(ys), -1).astype(np.float64)
    kk = kl = ll = 0.0
    perm_kl = np.zeros(count)
    for batch, lo in enumerate(range(0, len(xs), size)):
        x = fx[lo:lo + size] - fx[lo:lo + size].mean(0)
        y = fy[lo:lo + size] - fy[lo:lo + size].mean(0)
        k, l = x @ x.T, y @ y.T
        m = len(x)
        kk += m * _unbiased(k, k)
        ll += m * _unbiased(l, l)
        kl += m * _unbiased(k, l)
        for r, p in enumerate(_perms(seed, batch, m, count)):
            perm_kl[r] += m * _unbiased(k, l[np.ix_(p, p)])
    scale = math.sqrt(kk * ll)
    cka, perm = kl / scale, perm_kl / scale
    return cka, (1 + np.count_nonzero(perm >= cka - 1e-12)) / (1 + count)


def _metric(**params):
    return CKA.create(CKAParams(samples="images", pool="none", **params))


def _cka(xs, ys, **params):
    metric = _metric(**params)
    for i in range(len(xs)):
        metric.update(f"i{i}", {"a": {"x": torch.from_numpy(xs[i]).float()},
                                "b": {"y": torch.from_numpy(ys[i]).float()}})
    return metric.finish("a", "b")[("x", "y")]


def _weakly_related(rng, n):
    xs = rng.standard_normal((n, 3, 2, 2)).astype(np.float32).astype(np.float64)
    ys = (0.3 * xs[:, :2] + rng.standard_normal((n, 2, 2, 2))).astype(np.float32)
    return xs, ys.astype(np.float64)


@pytest.mark.parametrize("seed", [0, 7])
def test_p_equals_the_float64_reference_of_the_same_permutations(rng, seed):
    xs, ys = _weakly_related(rng, 24)
    value = _cka(xs, ys, batch_size=8, permutations=60, seed=seed)
    cka, p = reference_p(xs, ys, 8, 60, seed)
    assert isinstance(value, PValued)
    assert float(value) == pytest.approx(cka, abs=1e-9)
    assert value.p == pytest.approx(p, abs=1e-12)
    assert 1 / 61 < value.p < 1  # neither end: a weak relation, so the test checks counting


def test_null_p_values_are_calibrated(rng):
    """400 null trials (independent random features per image on the two sides): the rate
    of p < 0.05 lies within 0.03..0.07 (exactly 49/1000 in expectation with R = 999)."""
    ps = []
    for _ in range(400):
        xs = rng.standard_normal((16, 3, 2, 2))
        ys = rng.standard_normal((16, 2, 2, 2))
        ps.append(_cka(xs, ys, batch_size=8, permutations=999,
                       seed=int(rng.integers(2**31))).p)
    ps = np.array(ps)
    rate = float(np.mean(ps < 0.05))
    assert 0.03 <= rate <= 0.07, rate
    assert 0.4 < float(np.mean(ps)) < 0.6  # uniform on the whole, not only in its tail


def test_a_planted_relation_gives_the_smallest_p(rng):
    xs = rng.standard_normal((24, 3, 2, 2))
    w = rng.standard_normal((12, 8))
    ys = (xs.reshape(24, -1) @ w + 0.5 * rng.standard_normal((24, 8))).reshape(24, 2, 2, 2)
    value = _cka(xs, ys, batch_size=8, permutations=199)
    assert value > 0.5 and value.p == pytest.approx(1 / 200)


@pytest.mark.parametrize("cuts,ranks", [([3], 1), ([5, 10], 3), ([1, 2, 7, 8, 12], 2)])
def test_blocks_and_processes_give_the_p_of_one_pass(rng, cuts, ranks):
    from test_cka_minibatch import _in_blocks

    xs, ys = _weakly_related(rng, 14)
    one = _cka(xs, ys, batch_size=5, permutations=99)
    value, _ = _in_blocks(xs, ys, cuts, ranks, 5, permutations=99)
    assert float(value) == pytest.approx(float(one), abs=1e-12)
    assert value.p == one.p


def test_no_permutations_no_p_and_bad_seed(rng):
    xs, ys = _weakly_related(rng, 8)
    value = _cka(xs, ys, batch_size=4, permutations=0)
    assert not isinstance(value, PValued)
    with pytest.raises(ValueError, match="'permutations' only applies to samples: images"):
        CKAParams(permutations=9)
    with pytest.raises(ValueError, match="'seed' of the permutations must be >= 0"):
        CKAParams(samples="images", seed=-1)


def test_the_p_column_of_layer_similarity(tmp_path):
    """In a run in blocks cutting batches: the all-images rows carry p (the metric's own
    p for the same images), the per-image rows of other layer metrics leave it empty, and
    layer_similarity_summary.csv does not summarise it."""
    from mapsim.runner.run import run
    from mapsim.spec.run_spec import validate_spec

    spec = validate_spec({
        "name": "perm",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 2, "width": 3}, "seed": 1},
                   "b": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 2}},
        "layers": {"a": ["blocks.0", "blocks.1"], "b": ["blocks.0"]},
        "images": {"name": "synthetic-vessels", "count": 9, "size": [24, 24], "seed": 5},
        "comparisons": [["a", "b"]],
        "metrics": [{"name": "cka", "label": "cka"},
                    {"name": "cka", "label": "cka-images", "samples": "images",
                     "pool": "none", "batch_size": 4, "permutations": 99}],
        "aggregators": ["max"], "engine": {"block_images": 2}, "device": "cpu",
    })
    out = run(spec, out_dir=tmp_path / "out", progress=False).out_dir
    table = pd.read_csv(out / "layer_similarity.csv", keep_default_na=False, na_values=[""])
    assert list(table.columns)[-3:] == ["value", "reason", "p"]
    per_image = table[table.image != "all-images"]
    assert per_image.p.isna().all() and per_image.value.notna().all()
    across = table[table.image == "all-images"]
    assert len(across) == 2 and across.p.notna().all()
    assert ((across.p * 100).round(9) % 1 == 0).all() and (across.p <= 1).all()
    summary = pd.read_csv(out / "layer_similarity_summary.csv")
    assert set(summary.statistic) == {"value"}


def test_a_killed_then_resumed_run_gives_the_p_of_one_run(tmp_path):
    """A run killed in its third block (blocks of 2 images, batches of 4: batches cut by
    block ends) and resumed writes the bytes of one uninterrupted run, p included."""
    from test_blocks import _resumed_across_images, _workdir

    from mapsim.cli import main
    from mapsim.spec.run_spec import load_spec

    images = tmp_path / "made" / "imgs"
    assert main(["data", "synth", "--count", "8", "--size", "48", "56", "--out", str(images),
                 "--quiet"]) == 0
    work = tmp_path / "work"
    work.mkdir()
    metrics = [{"name": "cka", "samples": "images", "size": 2, "batch_size": 4,
                "permutations": 199, "seed": 3}]
    spec = load_spec(_workdir(work, images, metrics))
    across = _resumed_across_images(work, spec)
    assert len(across) == 2 * 2 + 2 * 2 and across.p.between(1 / 200, 1).all()
    assert ((across.p * 200).round(9) % 1 == 0).all()
