"""The built-in pruning criteria (``mapsim prune``).

- ``correlation``: removes the maps best explained by a kept map of the same layer (highest
  absolute Pearson correlation, from the layer's moments), one at a time: at each step, among
  the maps still kept, the map whose best kept partner has the highest |r| goes (ties: the one
  with the smaller variance, then the higher index); a constant (dead) map goes first. It stops
  after ``n_remove`` maps or, with ``threshold`` and no sparsity, when no kept map has a kept
  partner at |r| >= threshold. In a group of well-correlated maps this keeps one
  representative, which tends to be the map of largest variance. Each removed map's
  partner is its best-correlated kept map (the one whose affine fit leaves the least residual
  variance, ``var_j (1 - r^2)``).
- ``correlation-compensated``: the same choice, and each removed map is replaced in the next
  layer by the affine function of its partner (see :mod:`mapsim.pruning.compensate`).
- ``l1``: the filters with the smallest L1 norm of their weights (Li et al., 2017).
- ``bn-gamma``: the maps with the smallest batch-norm ``|gamma|`` (Liu et al., 2017).
- ``random``: maps drawn uniformly without replacement, reproducible per seed.
- ``hrank``: the maps with the lowest average matrix rank over the calibration images
  (Lin et al., 2020), each rank from a float32 SVD with numpy's default tolerance.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

import mapsim
from mapsim import hookimpl


def abs_correlation(moments: mapsim.Moments) -> tuple[np.ndarray, np.ndarray]:
    """(C, C) |Pearson r| from the moments (0 where a map is constant) and the (C,) variances."""
    g = moments.comoment.double().cpu().numpy()
    var = np.diag(g).copy()
    live = var > 1e-20 * max(float(var.max()), 1e-300)
    sd = np.sqrt(np.where(live, var, 1.0))
    r = np.abs(g / np.outer(sd, sd))
    r[~live, :] = 0.0
    r[:, ~live] = 0.0
    return r, np.where(live, var, 0.0)


class Correlation(mapsim.PruneCriterion):
    """Remove maps well correlated with a kept map of the same layer (see module docs)."""

    name = "correlation"
    supports_threshold = True
    uses_rng = False
    compensate = False

    class Params(mapsim.Params):
        threshold: float = Field(0.8, gt=0, le=1, description="|r| a map's best kept partner "
                                 "must reach for the map to be removed when no sparsity is "
                                 "given (the study's 'well correlated': 0.8).")

    def choose(self, layer, n_remove, rng):
        r, var = abs_correlation(layer.moments)
        n = layer.n_maps
        kept, removed = list(range(n)), []
        while len(kept) > 1 and (n_remove is None or len(removed) < n_remove):
            sub = r[np.ix_(kept, kept)].copy()
            np.fill_diagonal(sub, -1.0)
            best = sub.max(axis=1)
            best = np.where(var[kept] == 0, np.inf, best)  # constant maps first
            order = sorted(range(len(kept)), key=lambda k: (-best[k], var[kept[k]], -kept[k]))
            k = order[0]
            if n_remove is None and best[k] < self.params.threshold:
                break
            removed.append(kept.pop(k))
        partners = {}
        if self.compensate:
            for j in removed:
                partners[j] = kept[int(np.argmax(r[j, kept]))]
        return mapsim.PruneChoice(tuple(sorted(removed)), partners)


class CorrelationCompensated(Correlation):
    """``correlation``, with each removed map folded into the next layer as an affine
    function of its best-correlated kept map."""

    name = "correlation-compensated"
    compensate = True


class L1(mapsim.PruneCriterion):
    """Remove the filters with the smallest L1 norm of their weights."""

    name = "l1"
    uses_rng = False

    def choose(self, layer, n_remove, rng):
        return mapsim.PruneChoice.lowest(layer.weight.abs().sum(dim=(1, 2, 3)), n_remove)


class BNGamma(mapsim.PruneCriterion):
    """Remove the maps with the smallest batch-norm |gamma|."""

    name = "bn-gamma"
    uses_rng = False

    def choose(self, layer, n_remove, rng):
        if layer.gamma is None:
            raise mapsim.SpecError(f"criterion 'bn-gamma': {layer.name} has no batch norm; "
                                   "choose another criterion")
        return mapsim.PruneChoice.lowest(layer.gamma.abs(), n_remove)


class Random(mapsim.PruneCriterion):
    """Remove maps drawn uniformly at random (the rng is seeded from the spec's seed)."""

    name = "random"

    def choose(self, layer, n_remove, rng):
        picked = rng.choice(layer.n_maps, size=n_remove, replace=False)
        return mapsim.PruneChoice(tuple(sorted(int(j) for j in picked)))


class HRank(mapsim.PruneCriterion):
    """Remove the maps with the lowest average matrix rank over the calibration images."""

    name = "hrank"
    uses_rng = False

    class Params(mapsim.Params):
        images: int | None = Field(None, ge=1, description="Calibration images whose ranks "
                                   "are averaged (the first ones; default: all). HRank finds "
                                   "the average rank stable with few images; SVDs are slow.")

    def choose(self, layer, n_remove, rng):
        # float32 SVDs (float64 ones are slow on GPUs); default tolerance
        # sigma_max * max(H, W) * eps(float32), as numpy's matrix_rank on float32 maps
        maps = layer.maps if self.params.images is None else layer.maps[:self.params.images]
        ranks = torch.linalg.matrix_rank(maps.float()).double().mean(dim=0)
        return mapsim.PruneChoice.lowest(ranks, n_remove)


@hookimpl
def register_prune_criteria(register):
    for cls in (Correlation, CorrelationCompensated, L1, BNGamma, Random, HRank):
        register(cls)
