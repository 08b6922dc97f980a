"""Pearson correlation, the core metric (registered through the ``mapsim`` entry points)."""

from __future__ import annotations

from typing import ClassVar

import torch

from mapsim import MapMetric, MetricInfo, Moments, Params, hookimpl
from mapsim.plugins.metrics._normalise import normalised


class PearsonParams(Params):
    """Parameters of ``pearson``."""

    absolute: bool = True
    """Report |r| (the study's choice) rather than the signed correlation."""


class Pearson(MapMetric):
    """Pearson correlation between two maps, each flattened over the compared pixels.

    r_ij = G_ij / sqrt(G_ii G_jj) with G the centred co-moment matrix. Undefined (NaN) for a
    dead map (variance <= ``dead_std``^2); the original library filled those pairs with 1.0
    (both dead) and 0.0 (one dead), available as ``engine.dead_maps: original``.
    """

    name = "pearson"
    Params = PearsonParams
    info: ClassVar[MetricInfo] = MetricInfo(
        granularity="map",
        higher_is_more_similar=True,
        symmetric=True,
        value_range=(0.0, 1.0),
        invariances=("scale", "shift", "sign"),
    )
    dead_fill = (1.0, 0.0)
    examples = ({"absolute": True}, {"absolute": False})

    def __init__(self, params: PearsonParams | None = None) -> None:
        super().__init__(params)
        if not self.params.absolute:
            # value range and sign invariance depend on the parameter
            self.info = MetricInfo("map", True, True, (-1.0, 1.0), ("scale", "shift"))

    def from_moments(self, moments: Moments, rows: slice, cols: slice) -> torch.Tensor:
        g = moments.comoment
        diag = torch.diagonal(g)
        r = normalised(g[rows, cols], diag[rows], diag[cols])
        r.clamp_(-1.0, 1.0)  # rounding only: |r| <= 1 holds exactly for exact moments
        return r.abs_() if self.params.absolute else r

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        y = y.to(torch.float64)
        xc = x - x.mean(dim=1, keepdim=True)
        yc = y - y.mean(dim=1, keepdim=True)
        denom = torch.sqrt(torch.outer((xc * xc).sum(1), (yc * yc).sum(1)))
        live = denom > 0
        r = torch.where(live, (xc @ yc.T) / torch.where(live, denom, 1.0), torch.nan)
        r = r.clamp(-1.0, 1.0)
        return r.abs() if self.params.absolute else r


@hookimpl
def register_metrics(register) -> None:
    """Register the core metric ``pearson``."""
    register(Pearson)
