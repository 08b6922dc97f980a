"""The values that pass between the stages and reach plugins: moments, blocks, matrices.

Plain dataclasses with no dependency on the rest of mapsim, so that every stage (and every
plugin, through ``mapsim``) can use them without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Moments:
    """Moments of C maps over ``n`` pixels.

    Attributes:
        n: number of pixels (summed over merged images).
        mean: (C,) float64 mean of each map.
        comoment: (C, C) float64 centred sum of products, sum_p (z_i - m_i)(z_j - m_j).
    """

    n: int
    mean: torch.Tensor
    comoment: torch.Tensor
    #: row ranges (start, stop) of the layers, when the layer statistics were computed
    layers: tuple[tuple[int, int], ...] | None = None
    #: (L, L) float64 sum_p a_l(p) a_k(p) of the per-pixel centred squared norms per layer
    layer_norms: torch.Tensor | None = None
    #: (L, C) float64 sum_p a_l(p) (z_jp - m_j); needed to merge ``layer_norms`` exactly
    layer_third: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of maps C."""
        return int(self.mean.shape[0])

    def variance(self) -> torch.Tensor:
        """(C,) population variance of each map."""
        return torch.diagonal(self.comoment) / self.n

    def products(self) -> torch.Tensor:
        """(C, C) uncentred sum of products, sum_p z_i z_j = G + n m m^T."""
        return self.comoment + self.n * torch.outer(self.mean, self.mean)

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of both pixel sets (Chan et al. parallel update, float64)."""
        if other.size != self.size:
            raise ValueError(f"cannot merge moments of {self.size} and {other.size} maps")
        other = other.to(self.mean.device)
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        comoment = (
            self.comoment
            + other.comoment
            + torch.outer(delta, delta) * (self.n * other.n / n)
        )
        if self.layer_norms is None or other.layer_norms is None or self.layers != other.layers:
            return Moments(n, mean, comoment)
        norms_a, third_a = self._layer_stats_about(mean)
        norms_b, third_b = other._layer_stats_about(mean)
        return Moments(n, mean, comoment, self.layers, norms_a + norms_b, third_a + third_b)

    def _layer_stats_about(self, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer_norms`` and ``layer_third`` with the samples centred on ``centre``.

        With d = m - centre, a_l(p) becomes a_l(p) + 2 u_l(p) + |d_l|^2 (u_l(p): the dot
        product of layer l's centred values with d), and the sums expand into terms of G,
        the third moments and d (every term with a plain sum of centred values vanishes).
        """
        g, third, d = self.comoment, self.layer_third, self.mean - centre
        e = layer_indicator(self.layers, self.size, g.device)
        traces = e @ torch.diagonal(g)
        shift = e @ (d * d)
        w = e @ (d[:, None] * g)  # w_lj = sum_{i in l} d_i G_ij
        cross = third @ (d[:, None] * e.T)  # sum_p a_l(p) u_k(p)
        quad = w @ (d[:, None] * e.T)  # sum_p u_l(p) u_k(p)
        norms = (self.layer_norms + 2 * cross + 2 * cross.T + torch.outer(traces, shift)
                 + torch.outer(shift, traces) + 4 * quad + self.n * torch.outer(shift, shift))
        third = third + torch.outer(traces, d) + 2 * w + self.n * torch.outer(shift, d)
        return norms, third

    def layer_index(self, rows: slice) -> int:
        """Index of the layer with rows ``rows`` in ``layers`` (a ValueError if there is none)."""
        for index, (start, stop) in enumerate(self.layers or ()):
            if (start, stop) == (rows.start, rows.stop):
                return index
        raise ValueError(
            f"no per-layer statistics for rows {rows.start}:{rows.stop}; compute the moments "
            "with compute_moments(z, layers=[(start, stop), ...])"
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Moments:
        """A copy on ``device`` (``non_blocking``: as ``Tensor.to``; from a GPU to the host,
        valid once the work queued before it is done)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        extra = (None, None) if self.layer_norms is None else (
            move(self.layer_norms), move(self.layer_third))
        return Moments(self.n, move(self.mean), move(self.comoment), self.layers, *extra)


def layer_indicator(layers: tuple[tuple[int, int], ...], n_maps: int,
                    device: torch.device | str) -> torch.Tensor:
    """(L, C) float64 matrix: 1 where map j belongs to layer l."""
    e = torch.zeros(len(layers), n_maps, dtype=torch.float64, device=device)
    for index, (start, stop) in enumerate(layers):
        e[index, start:stop] = 1.0
    return e


@dataclass(frozen=True)
class Block:
    """The maps of one layer of one model: rows ``start:stop`` of a stacked matrix."""

    model: str
    layer: str
    start: int
    stop: int
    shape: tuple[int, int]

    @property
    def n_maps(self) -> int:
        return self.stop - self.start

    def shifted(self, offset: int) -> Block:
        """The same block with rows counted from ``offset``."""
        return Block(self.model, self.layer, self.start - offset, self.stop - offset, self.shape)


@dataclass
class SimilarityMatrix:
    """Values of one metric between every map of model A and every map of model B.

    ``values[i, j]`` compares map i of A (rows, grouped by ``blocks_a``) with map j of B.
    NaN marks a pair excluded because a map is dead (``dead_a``/``dead_b``).
    """

    metric: str
    model_a: str
    model_b: str
    values: np.ndarray
    blocks_a: list[Block]
    blocks_b: list[Block]
    dead_a: np.ndarray
    dead_b: np.ndarray
    higher_is_more_similar: bool = True
    #: how the maps were aligned onto one grid (``engine.align``), e.g. ``smaller/area 16x16``;
    #: None when they were compared at their own size
    aligned: str | None = None

    @property
    def same_model(self) -> bool:
        """True within one network: a map is then never its own partner."""
        return self.model_a == self.model_b

    def transposed(self) -> SimilarityMatrix:
        """The B -> A view (valid for symmetric metrics)."""
        return SimilarityMatrix(
            self.metric, self.model_b, self.model_a, self.values.T, self.blocks_b,
            self.blocks_a, self.dead_b, self.dead_a, self.higher_is_more_similar, self.aligned,
        )


@dataclass
class LayerValue:
    """One value of a layer-granularity metric for a layer pair.

    An undefined value is NaN with the metric's explanation in ``reason`` (else empty).
    """

    metric: str
    model_a: str
    layer_a: str
    model_b: str
    layer_b: str
    value: float
    reason: str = ""
    #: the value's permutation p-value (``cka`` over images); NaN where there is none
    p: float = float("nan")


class PValued(float):
    """A layer metric's value (a float) that carries its permutation p-value in ``p``: a
    metric returns it where it tests its value (``cka`` over images); it is the plain float
    everywhere else, and its ``p`` goes to the ``p`` column of ``layer_similarity.csv``."""

    p: float

    def __new__(cls, value: float, p: float) -> PValued:
        self = super().__new__(cls, value)
        self.p = float(p)
        return self
