"""``cosine``: cosine similarity between flattened maps, from the shared moments.

cos_ij = S_ij / sqrt(S_ii S_jj) with the uncentred products S = G + n m m^T, so cosine costs
no pass over the maps beyond the one product per image that Pearson uses.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mapsim import MapMetric, MetricInfo, Moments, Params, hookimpl
from mapsim.plugins.metrics._normalise import normalised


class CosineParams(Params):
    """Parameters of ``cosine``."""

    absolute: bool = True
    """Report |cos| (like the study's |r|) rather than the signed cosine."""


class Cosine(MapMetric):
    """Cosine of the angle between two maps, each flattened over the compared pixels.

    Unlike Pearson, the maps are not centred: adding a constant changes the value, scaling
    does not. A map is dead when it is all zero, i.e. its root mean square is <= ``dead_std``
    (a zero vector has no direction); dead pairs are handled exactly like Pearson's
    (excluded, or 1.0 both dead / 0.0 one dead with ``engine.dead_maps: original``).
    """

    name = "cosine"
    Params = CosineParams
    info: ClassVar[MetricInfo] = MetricInfo(
        granularity="map", higher_is_more_similar=True, symmetric=True,
        value_range=(0.0, 1.0), invariances=("scale", "sign"),
    )
    dead_fill = (1.0, 0.0)
    examples = ({"absolute": True}, {"absolute": False})

    def __init__(self, params: CosineParams | None = None) -> None:
        super().__init__(params)
        if not self.params.absolute:
            self.info = MetricInfo("map", True, True, (-1.0, 1.0), ("scale",))

    def dead(self, moments: Moments, dead_std: float) -> torch.Tensor:
        """All-zero maps: mean square (not variance) <= ``dead_std``^2."""
        return _product_diagonal(moments) / moments.n <= dead_std**2

    def from_moments(self, moments: Moments, rows: slice, cols: slice) -> torch.Tensor:
        # the (rows, cols) block and the diagonal of moments.products(), computed alone
        diag = _product_diagonal(moments)
        block = moments.comoment[rows, cols] + moments.n * torch.outer(
            moments.mean[rows], moments.mean[cols])
        return self._from_products(block, diag[rows], diag[cols])

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.to(torch.float64), y.to(torch.float64)
        z = torch.cat([x, y])
        return self._cosine(z @ z.T, slice(0, len(x)), slice(len(x), len(z)))

    def _cosine(self, s: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        diag = torch.diagonal(s)
        return self._from_products(s[rows, cols], diag[rows], diag[cols])

    def _from_products(self, block: torch.Tensor, diag_rows: torch.Tensor,
                       diag_cols: torch.Tensor) -> torch.Tensor:
        c = normalised(block, diag_rows, diag_cols)
        c.clamp_(-1.0, 1.0)  # rounding only: |cos| <= 1 holds for exact products
        return c.abs_() if self.params.absolute else c


def _product_diagonal(moments: Moments) -> torch.Tensor:
    """The diagonal of ``moments.products()`` (sum_p z_i^2), without the (C, C) matrix."""
    return torch.diagonal(moments.comoment) + moments.n * (moments.mean * moments.mean)


@hookimpl
def register_metrics(register) -> None:
    """Register ``cosine``."""
    register(Cosine)
