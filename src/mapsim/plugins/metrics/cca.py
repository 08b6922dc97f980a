"""``svcca`` and ``pwcca``: canonical correlation analysis between layers, pixels as samples.

A layer is a (P, C) matrix: every pixel (of one image, or of all images with
``engine.pooled``) is a sample, every map a feature. Both measures are read off the centred
co-moments mapsim accumulates anyway: with C_aa, C_ab, C_bb the covariance blocks of the
stacked maps of both layers,

* each layer is reduced to the eigenvectors V of its covariance (its SVD directions) that
  explain the fraction ``variance`` of its variance; directions whose variance is below
  1e-6 of the largest are dropped as numerically zero (dead maps, duplicated maps);
* the canonical correlations rho are the singular values of
  L_a^-1/2 V_a^T C_ab V_b L_b^-1/2 (L: the kept eigenvalues);
* **SVCCA** (Raghu et al. 2017) is the mean of the rho (default ``variance: 0.99``);
* **PWCCA** (Morcos et al. 2018) weights each rho by its canonical variate's projection on
  the layer's (centred) maps, alpha_i = sum_j |<h_i, x_j>| with unit-variance h_i, using the
  layer with fewer maps (layer a on a tie, so it is not symmetric then); default
  ``variance: 1`` (no truncation, as the paper).

The generic path (:meth:`from_maps`) computes the same from the maps through their SVDs
(canonical correlations as the singular values of Q_a^T Q_b, the orthonormal bases of the
kept directions; Björck and Golub 1973), so the contract tests check one against the other.

Undefined values name their reason: a layer whose maps are all constant, or no more pixels
than kept directions (CCA then finds correlations of 1 whatever the maps).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from mapsim import LayerMetric, MetricInfo, Moments, Params, Undefined, hookimpl

#: eigenvalues below this fraction of the largest are numerically zero
RANK_TOLERANCE = 1e-6
ZERO_VARIANCE = "zero variance: every map of {side} is constant over the pixels"
TOO_FEW = ("too few samples: n={n} pixels for {k} kept directions (layer_a {ka} + layer_b "
           "{kb}); CCA needs more samples than directions")


class CCAParams(Params):
    """Parameters of ``svcca`` and ``pwcca``."""

    variance: float = Field(0.99, gt=0.0, le=1.0)
    """Fraction of each layer's variance kept by the SVD truncation (1: keep every direction
    above the numerical rank tolerance)."""


class PWCCAParams(CCAParams):
    """Parameters of ``pwcca`` (no truncation by default, as Morcos et al.)."""

    variance: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of each layer's variance kept by the SVD truncation."""


def kept(eigenvalues: torch.Tensor, variance: float) -> int:
    """How many of the descending ``eigenvalues`` to keep: the fewest that explain the
    fraction ``variance`` of their sum, none below the rank tolerance."""
    lam = eigenvalues.clamp(min=0.0)
    above = int((lam > RANK_TOLERANCE * lam[0]).sum())
    if variance >= 1.0:
        return above
    share = torch.cumsum(lam, 0) / lam.sum()
    needed = int((share < variance - 1e-12).sum()) + 1
    return min(needed, above)


class _CCA(LayerMetric):
    """What SVCCA and PWCCA share: the kept bases and the canonical correlations."""

    Params = CCAParams
    weighted: ClassVar[bool] = False

    def from_moments(self, moments: Moments, rows: slice, cols: slice) -> float | Undefined:
        """From the covariance blocks of the co-moments (float64 eigendecompositions)."""
        g = moments.comoment.to(torch.float64)
        sides = []
        for side, index in (("layer_a", rows), ("layer_b", cols)):
            lam, vec = torch.linalg.eigh(g[index, index])
            lam, vec = lam.flip(0), vec.flip(1)
            if lam[0] <= 0:
                return Undefined(ZERO_VARIANCE.format(side=side))
            k = kept(lam, self.params.variance)
            sides.append((lam[:k], vec[:, :k]))
        (la, va), (lb, vb) = sides
        short = self._too_few(moments.n, len(la), len(lb))
        if short:
            return short
        wa, wb = va / la.sqrt(), vb / lb.sqrt()  # whitening: W^T G W = I
        u, rho, vt = torch.linalg.svd(wa.T @ g[rows, cols] @ wb, full_matrices=False)
        if not self.weighted:
            return float(rho.clamp(0.0, 1.0).mean())
        if self._use_a(rows.stop - rows.start, cols.stop - cols.start):
            alpha = (g[rows, rows] @ (wa @ u)).abs().sum(dim=0)
        else:
            alpha = (g[cols, cols] @ (wb @ vt.T)).abs().sum(dim=0)
        return self._weighted(rho, alpha)

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> float | Undefined:
        """From the SVDs of the centred maps x (C_a, P) and y (C_b, P), float64."""
        bases = []
        for side, maps in (("layer_a", x), ("layer_b", y)):
            xc = maps.to(torch.float64).T
            xc = xc - xc.mean(dim=0, keepdim=True)
            q, s, _ = torch.linalg.svd(xc, full_matrices=False)
            if s[0] <= 0:
                return Undefined(ZERO_VARIANCE.format(side=side))
            bases.append((q[:, :kept(s * s, self.params.variance)], xc))
        (qa, xa), (qb, xb) = bases
        short = self._too_few(x.shape[1], qa.shape[1], qb.shape[1])
        if short:
            return short
        u, rho, vt = torch.linalg.svd(qa.T @ qb, full_matrices=False)
        if not self.weighted:
            return float(rho.clamp(0.0, 1.0).mean())
        h, acts = (qa @ u, xa) if self._use_a(x.shape[0], y.shape[0]) else (qb @ vt.T, xb)
        return self._weighted(rho, (acts.T @ h).abs().sum(dim=0))

    @staticmethod
    def _too_few(n: int, ka: int, kb: int) -> Undefined | None:
        if n <= ka + kb:
            return Undefined(TOO_FEW.format(n=n, k=ka + kb, ka=ka, kb=kb))
        return None

    @staticmethod
    def _use_a(maps_a: int, maps_b: int) -> bool:
        """PWCCA weighs the canonical variates of the layer with fewer maps (a on a tie)."""
        return maps_a <= maps_b

    @staticmethod
    def _weighted(rho: torch.Tensor, alpha: torch.Tensor) -> float:
        alpha = alpha[: len(rho)]
        return float((alpha * rho.clamp(0.0, 1.0)).sum() / alpha.sum())


class SVCCA(_CCA):
    """SVCCA (Raghu et al. 2017): SVD-truncate each layer to the directions explaining
    ``variance`` of its variance, then the mean canonical correlation; pixels as samples."""

    name = "svcca"
    info: ClassVar[MetricInfo] = MetricInfo(
        granularity="layer", higher_is_more_similar=True, symmetric=True,
        value_range=(0.0, 1.0), invariances=("orthogonal", "scale", "shift", "sign"),
    )
    examples = ({}, {"variance": 0.9}, {"variance": 1.0})


class PWCCA(_CCA):
    """PWCCA (Morcos et al. 2018): canonical correlations weighted by how much of the layer's
    maps each canonical variate accounts for; pixels as samples."""

    name = "pwcca"
    Params = PWCCAParams
    weighted = True
    # the weights sum |projections| per map, so they depend on the map basis (no
    # orthogonal invariance), and come from one layer (not symmetric for equal sizes)
    info: ClassVar[MetricInfo] = MetricInfo(
        granularity="layer", higher_is_more_similar=True, symmetric=False,
        value_range=(0.0, 1.0), invariances=("scale", "shift", "sign"),
    )
    examples = ({}, {"variance": 0.95})


@hookimpl
def register_metrics(register) -> None:
    """Register ``svcca`` and ``pwcca``."""
    register(SVCCA)
    register(PWCCA)
