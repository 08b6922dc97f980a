"""First and second moments of stacked maps: the one product every moment-based metric reads.

For maps stacked as rows of Z (C maps x P pixels) :func:`compute_moments` returns the pixel
count, each map's mean and the centred co-moment matrix G = Zc Zc^T (Zc: Z with each row's
mean removed). Precision policy (DESIGN.md section 4):

* means are summed in float64;
* maps are centred in float32 before multiplying (so a large mean costs no precision);
* the pixel axis is split into chunks; each chunk is multiplied in float32 with TF32 disabled
  and the chunk products are accumulated in float64;
* moments of several images merge with the Chan et al. update, in float64.

Optionally (``layers=``, for debiased CKA with pixels as samples) the same chunked pass also
accumulates, in float64, per-layer statistics of the per-pixel centred squared norms
a_l(p) = sum_{i in layer l} (z_ip - m_i)^2: the (L, L) matrix sum_p a_l(p) a_k(p) and the
(L, C) third moments sum_p a_l(p) (z_jp - m_j), which make the merge across images exact.
Without ``layers`` nothing of this is computed and the co-moments are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: default pixels per chunk: keeps a float32 chunk product accurate to ~1e-6 in r.
DEFAULT_CHUNK_PIXELS = 16384
#: default memory for one centred float32 chunk (bytes).
DEFAULT_CHUNK_BYTES = 256 * 2**20


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

    def to(self, device: torch.device | str) -> Moments:
        """A copy on ``device``."""
        extra = (None, None) if self.layer_norms is None else (
            self.layer_norms.to(device), self.layer_third.to(device))
        return Moments(self.n, self.mean.to(device), self.comoment.to(device), self.layers,
                       *extra)


def layer_indicator(layers: tuple[tuple[int, int], ...], n_maps: int,
                    device: torch.device | str) -> torch.Tensor:
    """(L, C) float64 matrix: 1 where map j belongs to layer l."""
    e = torch.zeros(len(layers), n_maps, dtype=torch.float64, device=device)
    for index, (start, stop) in enumerate(layers):
        e[index, start:stop] = 1.0
    return e


@contextlib.contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """Disable TF32 (and other reduced-precision shortcuts) for float32 products."""
    previous = torch.get_float32_matmul_precision()
    previous_cuda = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        torch.backends.cuda.matmul.allow_tf32 = previous_cuda


def chunk_size(n_maps: int, n_pixels: int, chunk_pixels: int | None = None,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Pixels per chunk: the requested size, else the default capped by the memory budget."""
    if chunk_pixels is None:
        by_memory = max(1, chunk_bytes // (4 * max(n_maps, 1)))
        chunk_pixels = min(DEFAULT_CHUNK_PIXELS, by_memory)
    return max(1, min(int(chunk_pixels), max(n_pixels, 1)))


def compute_moments(z: torch.Tensor, chunk_pixels: int | None = None,
                    layers: list[tuple[int, int]] | None = None) -> Moments:
    """Moments of the rows of ``z`` (C maps x P pixels) on z's device.

    Args:
        z: (C, P) maps; cast to float32 if needed. Restrict pixels (ROI) before calling.
        chunk_pixels: pixels multiplied at a time (default: :data:`DEFAULT_CHUNK_PIXELS`,
            lowered so one centred chunk stays within :data:`DEFAULT_CHUNK_BYTES`).
        layers: row ranges (start, stop) of the layers; when given, the per-layer statistics
            ``layer_norms`` and ``layer_third`` are accumulated too (float64, same pass).
    """
    if z.dim() != 2:
        raise ValueError(f"expected maps as a (C, P) matrix, got shape {tuple(z.shape)}")
    n_maps, n_pixels = z.shape
    if n_pixels == 0:
        raise ValueError("cannot compute moments over zero pixels")
    z = z.to(torch.float32)
    step = chunk_size(n_maps, n_pixels, chunk_pixels)

    total = torch.zeros(n_maps, dtype=torch.float64, device=z.device)
    for start in range(0, n_pixels, step):
        total += z[:, start:start + step].sum(dim=1, dtype=torch.float64)
    mean = total / n_pixels
    mean32 = mean.to(torch.float32).unsqueeze(1)

    comoment = torch.zeros(n_maps, n_maps, dtype=torch.float64, device=z.device)
    # The float32 centring leaves a small residual mean r per map (|r| ~ eps * |m|);
    # its contribution n r r^T is removed exactly so large-mean maps keep full precision.
    residual = torch.zeros(n_maps, dtype=torch.float64, device=z.device)
    stats = None if layers is None else _LayerStats(layers, n_maps, z.device)
    with exact_float32_matmul():
        for start in range(0, n_pixels, step):
            centred = z[:, start:start + step] - mean32
            comoment += (centred @ centred.T).to(torch.float64)
            residual += centred.sum(dim=1, dtype=torch.float64)
            if stats is not None:
                stats.add(z[:, start:start + step].to(torch.float64) - mean[:, None])
    residual /= n_pixels
    comoment -= n_pixels * torch.outer(residual, residual)
    comoment = (comoment + comoment.T) / 2
    if stats is None:
        return Moments(n_pixels, mean, comoment)
    return Moments(n_pixels, mean, comoment, stats.layers, stats.norms, stats.third)


class _LayerStats:
    """Running float64 sums of the per-pixel centred squared norms of each layer."""

    def __init__(self, layers: list[tuple[int, int]], n_maps: int, device: torch.device) -> None:
        self.layers = tuple((int(a), int(b)) for a, b in layers)
        self.index = torch.empty(n_maps, dtype=torch.long, device=device)
        covered = torch.zeros(n_maps, dtype=torch.bool)
        for number, (start, stop) in enumerate(self.layers):
            if not 0 <= start < stop <= n_maps or bool(covered[start:stop].any()):
                raise ValueError(f"layer rows {start}:{stop} overlap or leave 0:{n_maps}")
            covered[start:stop] = True
            self.index[start:stop] = number
        if not bool(covered.all()):
            raise ValueError(f"the layers must cover every one of the {n_maps} rows")
        size = len(self.layers)
        self.norms = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.third = torch.zeros(size, n_maps, dtype=torch.float64, device=device)

    def add(self, centred: torch.Tensor) -> None:
        """Add a chunk of float64 maps centred on their exact means."""
        sq = torch.zeros(len(self.layers), centred.shape[1], dtype=torch.float64,
                         device=centred.device)
        sq.index_add_(0, self.index, centred * centred)
        self.norms += sq @ sq.T
        self.third += sq @ centred.T
