"""``spearman``: Spearman rank correlation between activation maps, as a mapsim plugin."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

import mapsim


class Spearman(mapsim.MapMetric):
    """Pearson correlation of the maps' pixel ranks (ties get their average rank).

    Invariant under any strictly increasing transform of a map. Ranks cannot be written from
    moments, so the metric implements only the generic path (``from_maps``); a MapMetric
    without ``from_moments`` gets its maps. NaN for a constant map.
    """

    name = "spearman"

    class Params(mapsim.Params):
        """Parameters of ``spearman``."""

        absolute: bool = True
        """Report |rho| rather than the signed correlation."""

    info = mapsim.MetricInfo(
        granularity="map",  # one (C_a, C_b) matrix per layer pair
        higher_is_more_similar=True,
        symmetric=True,
        value_range=(0.0, 1.0),
        invariances=("scale", "shift", "monotonic", "sign"),
    )
    def __init__(self, params: Spearman.Params | None = None) -> None:
        super().__init__(params)
        if not self.params.absolute:  # value range and sign invariance depend on the parameter
            self.info = mapsim.MetricInfo("map", True, True, (-1.0, 1.0),
                                          ("scale", "shift", "monotonic"))

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(C_a, C_b) float64 matrix of rank correlations between the rows of ``x`` and ``y``."""
        rx, ry = (rankdata(m.detach().cpu().to(torch.float64).numpy(), axis=1) for m in (x, y))
        xc = torch.from_numpy(rx - rx.mean(axis=1, keepdims=True))
        yc = torch.from_numpy(ry - ry.mean(axis=1, keepdims=True))
        denom = torch.sqrt(torch.outer((xc * xc).sum(1), (yc * yc).sum(1)))
        live = denom > 0  # a constant map has all ranks equal: undefined, like a dead map
        rho = torch.where(live, (xc @ yc.T) / torch.where(live, denom, 1.0), torch.nan)
        rho = rho.clamp(-1.0, 1.0).to(x.device)
        return rho.abs() if self.params.absolute else rho


@mapsim.hookimpl
def register_metrics(register) -> None:
    """Register ``spearman`` (mapsim calls this through the ``mapsim`` entry point)."""
    register(Spearman)
