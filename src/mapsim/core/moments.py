"""First and second moments of stacked maps: the one product every moment-based metric reads.

For maps stacked as rows of Z (C maps x P pixels) :func:`compute_moments` returns the pixel
count, each map's mean and the centred co-moment matrix G = Zc Zc^T (Zc: Z with each row's
mean removed). Precision policy (DESIGN.md section 4):

* means are summed in float64;
* maps are centred in float32 before multiplying (so a large mean costs no precision);
* the pixel axis is split into chunks; each chunk is multiplied in float32 with TF32 disabled
  and the chunk products are accumulated in float64;
* moments of several images merge with the Chan et al. update, in float64.
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
        n = self.n + other.n
        delta = other.mean.to(self.mean.device) - self.mean
        mean = self.mean + delta * (other.n / n)
        comoment = (
            self.comoment
            + other.comoment.to(self.comoment.device)
            + torch.outer(delta, delta) * (self.n * other.n / n)
        )
        return Moments(n, mean, comoment)

    def to(self, device: torch.device | str) -> Moments:
        """A copy on ``device``."""
        return Moments(self.n, self.mean.to(device), self.comoment.to(device))


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


def compute_moments(z: torch.Tensor, chunk_pixels: int | None = None) -> Moments:
    """Moments of the rows of ``z`` (C maps x P pixels) on z's device.

    Args:
        z: (C, P) maps; cast to float32 if needed. Restrict pixels (ROI) before calling.
        chunk_pixels: pixels multiplied at a time (default: :data:`DEFAULT_CHUNK_PIXELS`,
            lowered so one centred chunk stays within :data:`DEFAULT_CHUNK_BYTES`).
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
    with exact_float32_matmul():
        for start in range(0, n_pixels, step):
            centred = z[:, start:start + step] - mean32
            comoment += (centred @ centred.T).to(torch.float64)
            residual += centred.sum(dim=1, dtype=torch.float64)
    residual /= n_pixels
    comoment -= n_pixels * torch.outer(residual, residual)
    comoment = (comoment + comoment.T) / 2
    return Moments(n_pixels, mean, comoment)
