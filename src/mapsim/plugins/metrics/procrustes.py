"""``procrustes``: the orthogonal Procrustes distance between layers, pixels as samples.

A layer is a (P, C) matrix X (pixels x maps). Each layer is centred and scaled to unit
Frobenius norm; a layer with fewer maps is padded with zero maps. The distance is the residual
of the best rotation (Ding et al. 2021; Williams et al. 2021):

    d(X, Y) = min_Q ||X Q - Y||_F = sqrt(2 - 2 ||X^T Y||_*)

(||.||_*: the nuclear norm, the sum of singular values). ``angular: true`` gives the angle
arccos(||X^T Y||_*) in [0, pi/2] instead, a metric on shapes (Williams et al.). From the
moments, X^T Y = G_ab / sqrt(tr G_aa tr G_bb), so only a (C_a, C_b) SVD is needed per pair;
the generic path finds the rotation Q by the SVD of X^T Y and measures ||X Q - Y||_F itself.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from mapsim import LayerMetric, MetricInfo, Moments, Params, Undefined, hookimpl

ZERO_VARIANCE = "zero variance: every map of {side} is constant over the pixels"


class ProcrustesParams(Params):
    """Parameters of ``procrustes``."""

    angular: bool = False
    """Report the angle arccos(||X^T Y||_*) in [0, pi/2] instead of the distance in
    [0, sqrt(2)]."""


class Procrustes(LayerMetric):
    """Orthogonal Procrustes distance (or angle) between two layers: lower is more similar."""

    name = "procrustes"
    Params = ProcrustesParams
    info: ClassVar[MetricInfo] = MetricInfo(
        granularity="layer", higher_is_more_similar=False, symmetric=True,
        value_range=(0.0, math.sqrt(2.0)), invariances=("orthogonal", "scale", "shift", "sign"),
    )
    examples = ({}, {"angular": True})

    def __init__(self, params: ProcrustesParams | None = None) -> None:
        super().__init__(params)
        if self.params.angular:
            self.info = MetricInfo("layer", False, True, (0.0, math.pi / 2),
                                   self.info.invariances)

    def from_moments(self, moments: Moments, rows: slice, cols: slice) -> float | Undefined:
        """From the cross block and the traces of the co-moments."""
        g = moments.comoment.to(torch.float64)
        ta, tb = float(torch.trace(g[rows, rows])), float(torch.trace(g[cols, cols]))
        for t, side in ((ta, "layer_a"), (tb, "layer_b")):
            if t <= 0:
                return Undefined(ZERO_VARIANCE.format(side=side))
        nuclear = float(torch.linalg.svdvals(g[rows, cols]).sum()) / math.sqrt(ta * tb)
        nuclear = min(nuclear, 1.0)  # rounding only: ||X^T Y||_* <= ||X|| ||Y|| = 1
        if self.params.angular:
            return math.acos(nuclear)
        return math.sqrt(max(2.0 - 2.0 * nuclear, 0.0))

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> float | Undefined:
        """The residual of the best rotation of the normalised, zero-padded layers."""
        layers = []
        for side, maps in (("layer_a", x), ("layer_b", y)):
            xc = maps.to(torch.float64).T
            xc = xc - xc.mean(dim=0, keepdim=True)
            norm = torch.linalg.norm(xc)
            if norm <= 0:
                return Undefined(ZERO_VARIANCE.format(side=side))
            layers.append(xc / norm)
        xa, xb = layers
        width = max(xa.shape[1], xb.shape[1])
        xa = torch.nn.functional.pad(xa, (0, width - xa.shape[1]))
        xb = torch.nn.functional.pad(xb, (0, width - xb.shape[1]))
        u, _, vt = torch.linalg.svd(xa.T @ xb)
        residual = float(torch.linalg.norm(xa @ (u @ vt) - xb))
        if self.params.angular:  # ||XQ - Y||^2 = 2 - 2 cos(angle)
            return math.acos(min(max(1.0 - residual**2 / 2.0, -1.0), 1.0))
        return residual


@hookimpl
def register_metrics(register) -> None:
    """Register ``procrustes``."""
    register(Procrustes)
