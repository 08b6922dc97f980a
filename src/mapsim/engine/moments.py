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

import numpy as np
import torch

from mapsim.types import Moments, layer_indicator  # noqa: F401 (layer_indicator: re-exported)

#: default pixels per chunk: keeps a float32 chunk product accurate to ~1e-6 in r (16384 gave
#: up to 5e-6 on CPU BLAS, see tests/test_streaming.py).
DEFAULT_CHUNK_PIXELS = 4096
#: default memory for one centred float32 chunk (bytes).
DEFAULT_CHUNK_BYTES = 256 * 2**20


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


#: maps per block row of the symmetric product (only blocks on or above the diagonal are
#: multiplied; the rest is mirrored).
DEFAULT_BLOCK_ROWS = 128


def row_sums(x: torch.Tensor, dims: tuple[int, ...] = (1,)) -> torch.Tensor:
    """float64 sums of a float32 tensor over ``dims``. On the CPU through numpy, whose float64
    reduction of float32 data is ~10x faster than torch's; elsewhere through torch."""
    if x.device.type == "cpu":
        return torch.from_numpy(
            np.asarray(np.add.reduce(x.numpy(), axis=dims, dtype=np.float64)))
    return x.sum(dim=dims, dtype=torch.float64)


def local_centre_(chunks: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre every chunk of every map on the chunk's own mean, in place.

    ``chunks`` is a (k, C, n) float32 view whose first ``count`` pixels per chunk are data.
    Returns ``(a, s)``, both (k, C) float64: the float32 means that were subtracted and the
    sums of the values left. Maps are already centred on their global mean, but a map that is
    nearly constant over a chunk (e.g. a ReLU map that is zero almost everywhere) still gives a
    long run of same-signed products there, and a GPU's float32 products accumulate such runs
    with an error that grows with the chunk length; after this step each chunk product only
    sums what varies within the chunk. :func:`local_correction` adds back the exact rest.
    """
    data = chunks[..., :count]
    mean = row_sums(data, dims=(2,)) / count
    a32 = mean.to(torch.float32)
    data.sub_(a32.unsqueeze(2))
    a = a32.to(torch.float64)
    # the values left sum to count * (mean - a), up to the rounding of each subtraction (far
    # below the spread of the values), so no second pass over the chunk is needed
    s = (mean - a) * count
    return a, s


def local_correction(a: torch.Tensor, s: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(C, C) float64 term that :func:`local_centre_` took out of the chunk products:
    sum over chunks of a s^T + s a^T + count a a^T (``a``, ``s``: (k, C); ``counts``: (k,))."""
    cross = a.T @ s
    return cross + cross.T + (a * counts.unsqueeze(1)).T @ a


def gram(
    centred: torch.Tensor, rows: slice, cols: slice, step: int
) -> torch.Tensor:
    """float64 sum over pixel chunks of the float32 products ``centred[rows] @ centred[cols].T``
    (:func:`chunked_products`)."""
    return chunked_products(centred[rows], centred[cols], step)


def chunked_products(a_all: torch.Tensor, b_all: torch.Tensor, step: int) -> torch.Tensor:
    """float64 sum over pixel chunks of the float32 products ``a_all @ b_all.T`` (both maps x
    pixels).

    The pixel axis is cut into chunks of ``step`` pixels; all whole chunks are multiplied in one
    batched product (a strided view, no copy), each chunk's float32 result is summed in float64,
    and a last partial chunk is added the same way. TF32 must be off (see
    :func:`exact_float32_matmul`).
    """
    n_pixels = a_all.shape[1]
    whole = (n_pixels // step) * step
    out = torch.zeros(a_all.shape[0], b_all.shape[0], dtype=torch.float64, device=a_all.device)
    if whole:
        k = whole // step
        a = a_all[:, :whole].unflatten(1, (k, step)).transpose(0, 1)  # (k, rows, step)
        b = b_all[:, :whole].unflatten(1, (k, step)).transpose(0, 1)
        out += torch.bmm(a, b.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
    if whole < n_pixels:
        out += (a_all[:, whole:] @ b_all[:, whole:].T).to(torch.float64)
    return out


def symmetric_gram(centred: torch.Tensor, step: int, block_rows: int = DEFAULT_BLOCK_ROWS,
                   overwrite: bool = False) -> torch.Tensor:
    """float64 ``centred @ centred.T`` from the blocks on and above the diagonal only.

    Each chunk is first centred on its own means (:func:`local_centre_`; the exact remainder is
    added back in float64), in place when ``overwrite`` is true, else on a copy.

    Rows are taken ``block_rows`` at a time; each block row is multiplied with itself and the
    rows after it, and the part below the diagonal is mirrored, which saves close to half of the
    multiplications of a full product.
    """
    if not overwrite:
        centred = centred.clone()
    n_maps, n_pixels = centred.shape
    whole = (n_pixels // step) * step
    parts = []  # (a, s, counts) of the whole chunks and of the last partial one
    if whole:
        chunks = centred[:, :whole].unflatten(1, (whole // step, step)).transpose(0, 1)
        a, s = local_centre_(chunks, step)
        parts.append((a, s, torch.full((a.shape[0],), float(step), dtype=torch.float64,
                                       device=centred.device)))
    if whole < n_pixels:
        a, s = local_centre_(centred[None, :, whole:], n_pixels - whole)
        parts.append((a, s, torch.full((1,), float(n_pixels - whole), dtype=torch.float64,
                                       device=centred.device)))
    out = torch.empty(n_maps, n_maps, dtype=torch.float64, device=centred.device)
    for start in range(0, n_maps, block_rows):
        stop = min(start + block_rows, n_maps)
        upper = gram(centred, slice(start, stop), slice(start, n_maps), step)
        out[start:stop, start:] = upper
        out[stop:, start:stop] = upper[:, stop - start:].T
    for a, s, counts in parts:
        out += local_correction(a, s, counts)
    return (out + out.T) / 2  # diagonal blocks: exactly symmetric


def compute_moments(z: torch.Tensor, chunk_pixels: int | None = None,
                    layers: list[tuple[int, int]] | None = None,
                    block_rows: int = DEFAULT_BLOCK_ROWS) -> Moments:
    """Moments of the rows of ``z`` (C maps x P pixels) on z's device.

    ``z`` is not modified: pixels are centred a memory-bounded stretch at a time (a whole
    number of chunks within :data:`DEFAULT_CHUNK_BYTES`, at least one chunk).

    Args:
        z: (C, P) maps; cast to float32 if needed. Restrict pixels (ROI) before calling.
        chunk_pixels: pixels multiplied at a time (default: :data:`DEFAULT_CHUNK_PIXELS`,
            lowered so one centred chunk stays within :data:`DEFAULT_CHUNK_BYTES`).
        layers: row ranges (start, stop) of the layers; when given, the per-layer statistics
            ``layer_norms`` and ``layer_third`` are accumulated too (float64, same pass).
        block_rows: maps per block row of the symmetric product.
    """
    if z.dim() != 2:
        raise ValueError(f"expected maps as a (C, P) matrix, got shape {tuple(z.shape)}")
    n_maps, n_pixels = z.shape
    if n_pixels == 0:
        raise ValueError("cannot compute moments over zero pixels")
    z = z.to(torch.float32)
    step = chunk_size(n_maps, n_pixels, chunk_pixels)
    stretch = step * max(1, DEFAULT_CHUNK_BYTES // (4 * max(n_maps, 1) * step))

    total = torch.zeros(n_maps, dtype=torch.float64, device=z.device)
    for start in range(0, n_pixels, stretch):
        total += row_sums(z[:, start:start + stretch])
    mean = total / n_pixels
    mean32 = mean.to(torch.float32).unsqueeze(1)

    comoment = torch.zeros(n_maps, n_maps, dtype=torch.float64, device=z.device)
    # The float32 centring leaves a small residual mean r per map (|r| ~ eps * |m|);
    # its contribution n r r^T is removed exactly so large-mean maps keep full precision.
    residual = torch.zeros(n_maps, dtype=torch.float64, device=z.device)
    stats = None if layers is None else _LayerStats(layers, n_maps, z.device)
    with exact_float32_matmul():
        for start in range(0, n_pixels, stretch):
            centred = z[:, start:start + stretch] - mean32
            residual += row_sums(centred)
            comoment += symmetric_gram(centred, step, block_rows, overwrite=True)
            if stats is not None:
                for part in range(start, min(start + stretch, n_pixels), step):
                    stats.add(z[:, part:part + step].to(torch.float64) - mean[:, None])
    moments = _finish(n_pixels, mean, comoment, residual)
    if stats is None:
        return moments
    return Moments(n_pixels, moments.mean, moments.comoment, stats.layers, stats.norms,
                   stats.third)


def variance_moments(z: torch.Tensor) -> Moments:
    """Moments of the rows of ``z`` (C maps x P pixels) with only the diagonal of the
    co-moment matrix (each map's centred sum of squares; zeros elsewhere): what the dead-map
    flags need when no metric reads the cross products (a run of metrics over images only),
    at a cost linear in the maps instead of quadratic."""
    if z.dim() != 2 or z.shape[1] == 0:
        raise ValueError(f"expected maps as a (C, P) matrix with pixels, got {tuple(z.shape)}")
    n_maps, n_pixels = z.shape
    z = z.to(torch.float32)
    stretch = max(1, DEFAULT_CHUNK_BYTES // (4 * max(n_maps, 1)))
    total = torch.zeros(n_maps, dtype=torch.float64, device=z.device)
    for start in range(0, n_pixels, stretch):
        total += row_sums(z[:, start:start + stretch])
    mean = total / n_pixels
    mean32 = mean.to(torch.float32).unsqueeze(1)
    squares = torch.zeros(n_maps, dtype=torch.float64, device=z.device)
    residual = torch.zeros(n_maps, dtype=torch.float64, device=z.device)
    for start in range(0, n_pixels, stretch):
        centred = z[:, start:start + stretch] - mean32
        residual += row_sums(centred)
        squares += row_sums(centred * centred)
    residual /= n_pixels
    return Moments(n_pixels, mean, torch.diag(squares - n_pixels * residual * residual))


def _finish(n_pixels: int, mean: torch.Tensor, comoment: torch.Tensor,
            residual_sum: torch.Tensor) -> Moments:
    residual = residual_sum / n_pixels
    comoment = comoment - n_pixels * torch.outer(residual, residual)
    comoment = (comoment + comoment.T) / 2
    return Moments(n_pixels, mean, comoment)


#: map dtypes that :meth:`MomentsBuilder.add` writes into a pixel-major buffer as they are
_WIDENED_ON_WRITE = (torch.float16, torch.bfloat16)


class MomentsBuilder:
    """Moments of maps that arrive one layer at a time (e.g. from forward hooks).

    The builder owns one float32 buffer laid out chunk-major, ``(chunks, n_maps, chunk
    pixels)``, zero-padded at the end of the pixel axis (zeros add nothing to centred sums and
    products), so that every chunk product is one matrix of one batched multiplication with no
    copy. :meth:`add` writes a layer's maps into their rows, each chunk centred on its own
    mean (sums in float64; the exact remainder is added to the products in float64); with
    ``block_rows=None`` it also multiplies them at once with every row already added (the
    blocks on and below the diagonal only), so the caller can drop the activation as soon as
    :meth:`add` returns; with ``block_rows=N`` the products are made in :meth:`finish`, N rows
    at a time, blocks on and above the diagonal only. :meth:`finish` gives the same
    :class:`Moments` as :func:`compute_moments` on the stacked maps (same precision policy:
    float32 chunk products with TF32 off, float64 accumulation). ``float64_products`` converts
    the centred chunks to float64 before multiplying (more exact; as fast as float32 only on
    GPUs with fast float64, such as the H100). ``pixel_major`` stores each chunk as
    ``(chunk pixels, n_maps)`` instead: the memory order of channels-last activations (what
    the runner uses on GPUs), so that writing a layer into the buffer reads and writes
    contiguous runs of maps instead of transposing; the products read the same chunks as
    transposed matrices, at no cost.
    """

    def __init__(self, n_maps: int, n_pixels: int, device: torch.device | str,
                 chunk_pixels: int | None = None, block_rows: int | None = None,
                 float64_products: bool = False, pixel_major: bool = False) -> None:
        if n_pixels <= 0:
            raise ValueError("cannot compute moments over zero pixels")
        self.n_maps = n_maps
        self.n_pixels = n_pixels
        self.step = chunk_size(n_maps, n_pixels, chunk_pixels)
        self.block_rows = block_rows
        self.float64_products = float64_products
        self.n_chunks = -(-n_pixels // self.step)
        self.pixel_major = pixel_major
        shape = (self.n_chunks, self.step, n_maps) if pixel_major else (
            self.n_chunks, n_maps, self.step)
        self.buffer = torch.zeros(shape, dtype=torch.float32, device=device)
        self.mean = torch.zeros(n_maps, dtype=torch.float64, device=device)
        #: pixels per chunk, (1, chunks); the last chunk may be shorter (zero-padded buffer)
        self.counts = torch.full((1, self.n_chunks), float(self.step), dtype=torch.float64,
                                 device=device)
        self.counts[0, -1] = n_pixels - (self.n_chunks - 1) * self.step
        #: per chunk and map: the (rounded) chunk mean subtracted minus the map's mean, and
        #: the sum of the values written to the buffer, (chunks, maps), float64
        self.offset = torch.zeros(self.n_chunks, n_maps, dtype=torch.float64, device=device)
        self.leftover = torch.zeros(self.n_chunks, n_maps, dtype=torch.float64, device=device)
        self.comoment = torch.zeros(n_maps, n_maps, dtype=torch.float64, device=device)
        self.filled = 0

    def reset(self) -> None:
        """Start a new set of maps (the buffers are reused)."""
        self.filled = 0

    def _chunks(self, chunks: slice, rows: slice) -> torch.Tensor:
        """The (chunks, rows, step) view of the buffer (strided, never a copy)."""
        if self.pixel_major:
            return self.buffer[chunks, :, rows].transpose(1, 2)
        return self.buffer[chunks, rows]

    def _gram(self, rows: slice, cols: slice) -> torch.Tensor:
        every = slice(0, self.n_chunks)
        chunks = self._chunks(every, rows)  # a strided batch of matrices, no copy
        others = self._chunks(every, cols)
        if not self.float64_products:
            with exact_float32_matmul():
                return torch.bmm(chunks, others.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
        out = torch.zeros(chunks.shape[1], others.shape[1], dtype=torch.float64,
                          device=chunks.device)
        group = max(1, DEFAULT_CHUNK_BYTES // (8 * max(others.shape[1], 1) * self.step))
        for k in range(0, self.n_chunks, group):
            a = chunks[k:k + group].to(torch.float64)
            b = others[k:k + group].to(torch.float64)
            out += torch.bmm(a, b.transpose(1, 2)).sum(dim=0)
        return out

    def add(self, maps: torch.Tensor) -> slice:
        """Add the next ``maps`` (C, P), in row order; returns their rows. Half-precision
        maps (an fp16 or bf16 forward pass) are widened to float32 as they are written into
        the pixel-major buffer, without a float32 copy of the layer first."""
        maps = maps.reshape(maps.shape[0], -1)
        if not (self.pixel_major and maps.dtype in _WIDENED_ON_WRITE):
            maps = maps.to(torch.float32)
        rows = slice(self.filled, self.filled + int(maps.shape[0]))
        if rows.stop > self.n_maps or maps.shape[1] != self.n_pixels:
            raise ValueError(
                f"maps of shape {tuple(maps.shape)} do not fit rows {rows.start}:{rows.stop} "
                f"of a {self.n_maps} x {self.n_pixels} builder"
            )
        # Each chunk of each map is centred on its own mean as it is written: a map that is
        # nearly constant over a chunk (a ReLU map that is zero almost everywhere) then gives
        # no long run of same-signed float32 products, whose rounding error grows with the
        # chunk on a GPU. The exact rest is added in float64 (see _correction).
        if self.pixel_major:
            self._write_pixel_major(maps, rows)
        else:
            self._write_map_major(maps, rows)
        if self.block_rows is None:
            done = slice(0, rows.stop)
            block = self._gram(rows, done) + self._correction(rows, done)
            self.comoment[rows, :rows.stop] = block
            self.comoment[:rows.start, rows] = block[:, :rows.start].T
        self.filled = rows.stop
        return rows

    def _write_map_major(self, maps: torch.Tensor, rows: slice) -> None:
        """Centre on float64 chunk means rounded to float32; the sums of the values written
        follow from the rounding, with no pass over the buffer."""
        whole = self.n_pixels // self.step
        sums = torch.zeros(maps.shape[0], self.n_chunks, dtype=torch.float64, device=maps.device)
        if whole:
            source = maps[:, :whole * self.step].unflatten(1, (whole, self.step))
            sums[:, :whole] = row_sums(source, dims=(2,))
        if whole < self.n_chunks:
            sums[:, whole] = row_sums(maps[:, whole * self.step:])
        chunk_mean = sums / self.counts
        chunk_mean32 = chunk_mean.to(torch.float32)
        if whole:
            torch.sub(source.transpose(0, 1), chunk_mean32[:, :whole].T.unsqueeze(2),
                      out=self._chunks(slice(0, whole), rows))
        if whole < self.n_chunks:
            tail = maps[:, whole * self.step:]
            torch.sub(tail, chunk_mean32[:, whole:],
                      out=self._chunks(slice(whole, whole + 1), rows)[0, :, :tail.shape[1]])
        mean = sums.sum(dim=1) / self.n_pixels
        self.mean[rows] = mean
        rounded = chunk_mean32.to(torch.float64)
        self.offset[:, rows] = (rounded - mean.unsqueeze(1)).T  # chunk mean used - map mean
        # the values written sum to count * (chunk mean - rounded), up to the rounding of each
        # subtraction (far below the spread of the values): no pass over the buffer is needed
        self.leftover[:, rows] = ((chunk_mean - rounded) * self.counts).T

    def _write_pixel_major(self, maps: torch.Tensor, rows: slice) -> None:
        """Centre on float32 chunk means (any centre near the mean works) and take the sums of
        the values written from the buffer, in float32 within a chunk (they are centred, so
        their rounding is far below the spread of the values) and float64 across chunks:
        small reductions that read whole rows of maps, instead of a float64 pass over the maps
        (on an H100, 0.7 ms per layer of CNN10 at 1376 x 1104 px)."""
        whole = self.n_pixels // self.step
        centre = torch.empty(self.n_chunks, maps.shape[0], dtype=torch.float32,
                             device=maps.device)
        written = torch.empty_like(centre)
        pixels = maps.T  # (P, C): a view, contiguous for channels-last maps
        # half-precision maps are widened inside the kernels (float32 sums and differences)
        if whole:
            source = pixels[:whole * self.step].unflatten(0, (whole, self.step))
            target = self.buffer[:whole, :, rows]
            torch.mean(source, dim=1, dtype=torch.float32, out=centre[:whole])
            torch.sub(source, centre[:whole].unsqueeze(1), out=target)
            torch.sum(target, dim=1, out=written[:whole])
        if whole < self.n_chunks:
            tail = pixels[whole * self.step:]
            target = self.buffer[whole, :tail.shape[0], rows]
            torch.mean(tail, dim=0, dtype=torch.float32, out=centre[whole])
            torch.sub(tail, centre[whole], out=target)
            torch.sum(target, dim=0, out=written[whole])
        centre64, written64 = centre.to(torch.float64), written.to(torch.float64)
        mean = (centre64 * self.counts.T + written64).sum(dim=0) / self.n_pixels
        self.mean[rows] = mean
        self.offset[:, rows] = centre64 - mean  # chunk centre used - map mean
        self.leftover[:, rows] = written64

    def maps(self, centred: bool = False) -> torch.Tensor:
        """The maps added so far, (rows added x pixels) float32, in row order: the buffer's
        centred values plus their chunk centres (``centred``: minus each map's mean, i.e.
        plus the chunk centre's offset from the mean), each value the map's own up to the
        rounding of two float32 operations (about 1e-7 of it). The streaming path's spatial
        null shifts these (:mod:`mapsim.engine.null`)."""
        rows = slice(0, self.filled)
        centre = self.offset[:, rows] if centred else self.offset[:, rows] + self.mean[rows]
        centre = centre.to(torch.float32)  # (chunks, rows)
        out = torch.empty(self.filled, self.n_chunks, self.step, dtype=torch.float32,
                          device=self.buffer.device)
        torch.add(self._chunks(slice(0, self.n_chunks), rows).transpose(0, 1),
                  centre.T.unsqueeze(2), out=out)
        return out.reshape(self.filled, -1)[:, :self.n_pixels]

    def _correction(self, rows: slice, cols: slice) -> torch.Tensor:
        """What the chunk centring took out of the products of ``rows`` and ``cols``."""
        a_rows, a_cols = self.offset[:, rows], self.offset[:, cols]
        s_rows, s_cols = self.leftover[:, rows], self.leftover[:, cols]
        weighted = a_rows * self.counts.T
        return a_rows.T @ s_cols + s_rows.T @ a_cols + weighted.T @ a_cols

    def finish(self) -> Moments:
        """The moments of every row added (all ``n_maps`` rows must have been added)."""
        if self.filled != self.n_maps:
            raise ValueError(f"only {self.filled} of {self.n_maps} maps were added")
        if self.block_rows is not None:
            for start in range(0, self.n_maps, self.block_rows):
                stop = min(start + self.block_rows, self.n_maps)
                cols = slice(start, self.n_maps)
                upper = self._gram(slice(start, stop), cols)
                upper += self._correction(slice(start, stop), cols)
                self.comoment[start:stop, start:] = upper
                self.comoment[stop:, start:stop] = upper[:, stop - start:].T
        comoment = (self.comoment + self.comoment.T) / 2
        return Moments(self.n_pixels, self.mean.clone(), comoment)


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
