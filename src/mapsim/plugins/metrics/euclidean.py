"""``euclidean``: distance between flattened maps, from the shared moments.

||x - y||^2 is computed from the centred co-moments as G_ii + G_jj - 2 G_ij + n (m_i - m_j)^2
(the same quantity as S_ii + S_jj - 2 S_ij with S = G + n m m^T, but without the cancellation
of large uncentred products). With ``standardise`` the maps are z-scored first (population
std), so the squared distance is 2 n (1 - r_ij) with r Pearson's signed correlation.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from mapsim import MapMetric, MetricInfo, Moments, Params, hookimpl
from mapsim.plugins.metrics._normalise import normalised


class EuclideanParams(Params):
    """Parameters of ``euclidean``."""

    standardise: bool = False
    """z-score each map over the compared pixels first (subtract its mean, divide by its
    population std), so only the maps' shapes are compared."""
    rms: bool = False
    """Root-mean-square form: divide the distance by sqrt(P) (P: compared pixels), so values
    are comparable across image sizes and ROIs."""


class Euclidean(MapMetric):
    """Euclidean distance between two maps: lower is more similar (best partner = minimum).

    Without ``standardise`` every map is defined (an all-zero map is simply at distance
    ||y|| from y), so no map is dead. With ``standardise`` a constant map (variance <=
    ``dead_std``^2) has no z-score and is dead. There is no "original" dead-map rule for a
    distance; use ``engine.dead_maps: exclude``. Aggregators read ``higher_is_more_similar =
    False``: ``max`` picks the smallest distance, ``threshold`` keeps distances <= its value.
    """

    name = "euclidean"
    Params = EuclideanParams
    info: ClassVar[MetricInfo] = MetricInfo(
        granularity="map", higher_is_more_similar=False, symmetric=True,
        value_range=(0.0, math.inf), invariances=(),
    )
    examples = ({}, {"rms": True}, {"standardise": True}, {"standardise": True, "rms": True})

    def __init__(self, params: EuclideanParams | None = None) -> None:
        super().__init__(params)
        p = self.params
        if p.standardise:
            upper = 2.0 if p.rms else math.inf  # |z_x - z_y|^2 <= 4 n
            self.info = MetricInfo("map", False, True, (0.0, upper), ("scale", "shift"))

    def dead(self, moments: Moments, dead_std: float) -> torch.Tensor:
        if self.params.standardise:
            return moments.variance() <= dead_std**2
        return torch.zeros(moments.size, dtype=torch.bool, device=moments.mean.device)

    def from_moments(self, moments: Moments, rows: slice, cols: slice) -> torch.Tensor:
        return self._distance(moments.comoment, moments.mean, moments.n, rows, cols)

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = torch.cat([x, y]).to(torch.float64)
        mean = z.mean(dim=1)
        zc = z - mean[:, None]
        return self._distance(zc @ zc.T, mean, z.shape[1], slice(0, len(x)),
                              slice(len(x), len(z)))

    def _distance(self, g: torch.Tensor, mean: torch.Tensor, n: int, rows: slice,
                  cols: slice) -> torch.Tensor:
        diag = torch.diagonal(g)
        if self.params.standardise:
            r = normalised(g[rows, cols], diag[rows], diag[cols])
            squared = 2.0 * n * (1.0 - r.clamp_(-1.0, 1.0))
        else:
            gap = mean[rows, None] - mean[None, cols]
            squared = diag[rows, None] + diag[None, cols] - 2.0 * g[rows, cols] + n * gap * gap
        # rounding only: an exact squared distance is >= 0 (NaN marks dead maps and stays)
        distance = squared.clamp_(min=0.0).sqrt_()
        return distance.div_(math.sqrt(n)) if self.params.rms else distance


@hookimpl
def register_metrics(register) -> None:
    """Register ``euclidean``."""
    register(Euclidean)
