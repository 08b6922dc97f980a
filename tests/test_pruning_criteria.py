"""The built-in pruning criteria: exact counts, references in numpy, reproducible randomness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mapsim.pruning.prune import layer_view, prune_model, removal_count
from mapsim.registry import load_registry


@pytest.fixture(scope="module")
def model():
    from mapsim.plugins.fcn import FCN

    torch.manual_seed(3)
    m = FCN(depth=3, width=8, kernel_size=3, conv="direct").eval()
    with torch.no_grad():
        for block in m.blocks:
            block.bn.weight.uniform_(-1, 1)
    return m


IMAGES = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))


def make(name, **params):
    reg = load_registry()
    cls = reg.get("prune_criterion", name).cls
    return cls(cls.Params(**params))


@pytest.mark.parametrize("name", ["correlation", "correlation-compensated", "l1", "bn-gamma",
                                  "random", "hrank"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_equal_sparsity_removes_exactly(model, name, sparsity):
    out = prune_model(model, make(name), IMAGES, sparsity=sparsity)
    for path, removed in out.removed.items():
        assert len(removed) == removal_count(sparsity, 8) == round(sparsity * 8)
        assert sorted(out.kept[path] + removed) == list(range(8))
    x = torch.randn(1, 1, 12, 12)
    with torch.no_grad():
        assert out.model(x).shape == (1, 2, 12, 12)


def test_l1_and_gamma_match_numpy(model):
    view = layer_view(model, "blocks.1", IMAGES)
    w = model.blocks[1].conv.weight.detach().double().numpy()
    l1 = np.abs(w).sum(axis=(1, 2, 3))
    assert list(make("l1").choose(view, 3, None).remove) == sorted(np.argsort(l1)[:3])
    g = np.abs(model.blocks[1].bn.weight.detach().double().numpy())
    assert list(make("bn-gamma").choose(view, 3, None).remove) == sorted(np.argsort(g)[:3])


def test_hrank_matches_numpy_rank(model):
    view = layer_view(model, "blocks.0", IMAGES)
    maps = view.maps.float().numpy()  # float32 SVDs, numpy's default tolerance
    ranks = np.array([[np.linalg.matrix_rank(maps[n, c]) for c in range(8)]
                      for n in range(2)]).mean(axis=0)
    assert list(make("hrank").choose(view, 2, None).remove) == \
        sorted(np.argsort(ranks, kind="stable")[:2])
    first = np.array([np.linalg.matrix_rank(maps[0, c]) for c in range(8)])
    assert list(make("hrank", images=1).choose(view, 2, None).remove) == \
        sorted(np.argsort(first, kind="stable")[:2])


def test_random_is_reproducible_per_seed(model):
    a = prune_model(model, make("random"), IMAGES, sparsity=0.5, seed=1).removed
    b = prune_model(model, make("random"), IMAGES, sparsity=0.5, seed=1).removed
    c = prune_model(model, make("random"), IMAGES, sparsity=0.5, seed=2).removed
    assert a == b and a != c


def test_correlation_threshold_removes_the_best_correlated_first(model):
    view = layer_view(model, "blocks.2", IMAGES)
    maps = view.maps.double().numpy().transpose(1, 0, 2, 3).reshape(8, -1)
    with np.errstate(invalid="ignore"):
        r = np.abs(np.nan_to_num(np.corrcoef(maps)))
    np.fill_diagonal(r, 0)
    dead = np.flatnonzero(maps.std(axis=1) == 0)  # constant maps go first, then the best pair
    removed = make("correlation").choose(view, len(dead) + 1, None).remove
    assert set(dead) <= set(removed)
    assert (set(removed) - set(dead)) & set(np.unravel_index(np.argmax(r), r.shape))
    threshold = float(r.max()) + 1e-6  # above every live pair: only the constant maps go
    assert make("correlation", threshold=min(threshold, 1.0)).choose(view, None, None) \
        .remove == tuple(dead)


def test_baseline_without_sparsity_is_refused(model):
    from mapsim.errors import SpecError

    with pytest.raises(SpecError, match="needs a sparsity"):
        prune_model(model, make("l1"), IMAGES, sparsity=None)


def test_sparsity_outside_range_and_unknown_layer(model):
    from mapsim.errors import SpecError

    with pytest.raises(SpecError, match=r"outside \[0, 1\)"):
        removal_count(1.0, 8)
    with pytest.raises(SpecError, match="blocks.0, blocks.1, blocks.2"):
        prune_model(model, make("l1"), IMAGES, sparsity=0.5, layers=["blocks.9"])
