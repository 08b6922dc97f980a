"""2-D convolution through the FFT, for large kernels on the CPU (inference only).

``fft_conv2d(x, weight, bias, padding)`` equals ``F.conv2d(x, weight, bias, padding=padding)``
(stride 1, dilation 1, groups 1, zero padding) up to float32 rounding. With the study's 7x7
kernels at 64 -> 64 maps a direct convolution costs 49 * 64 * 64 multiply-adds per output
pixel; here the output pixels cost one 64 x 64 complex matrix product per frequency bin of a
32 x 32 tile (544 bins for 676 output pixels), plus the tiles' FFTs: about 13x fewer
floating-point operations. On this project's 2-core CPU it measured 2.8x faster per layer (the
FFTs and transposes are memory-bound).

Method (overlap-save): the zero-padded input is cut into overlapping ``T x T`` tiles (stride
``T - k + 1``), each tile is transformed with ``torch.fft.rfft2``, multiplied per frequency bin
by the conjugate spectrum of the kernel (``conv2d`` is a cross-correlation, which is a product
with the conjugate spectrum: no kernel flip needed), summed over input channels as one batched
complex matrix product, transformed back, and the first ``T - k + 1`` rows and columns of each
tile (the ones no circular wrap-around reaches) are stitched together. Tiles keep the kernel
spectrum small (``C x O x T x (T/2+1)`` complex numbers) and let one product serve every tile
of every image in the batch.

The kernel spectrum is computed in float64 and stored as complex64; it is cached per weight,
tile size, device and dtype, and recomputed when the weight changes (its ``_version`` counter or
storage moves, or its values' fingerprint changes). Activations stay float32.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from mapsim import ShapeMismatchError

# id(weight) -> (weak reference to the weight, cache key, spectrum); entries go with the weight
#: bytes of the float32 tiles of one pass of :func:`fft_conv2d` (its spectra and products are
#: about as large again, twice); larger images go through in rows of tiles
TILE_BYTES = 64 << 20
_SPECTRA: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}

# Tile (FFT) sizes are powers of two, on which the FFTs measured fastest here (sizes such as 28
# or 30 were 1.5-3x slower per point on this project's CPU).


def tile_size(kernel: int, height: int, width: int) -> int:
    """The FFT tile size for a ``kernel`` x ``kernel`` convolution of a ``height`` x ``width``
    output: the power of two minimising the estimated cost per output pixel (complex
    products, proportional to ``T^2 / (T - k + 1)^2``, plus FFTs, ``~ log T`` per pixel), not
    larger than the padded map needs."""
    best, best_cost = None, math.inf
    span = max(height, width) + kernel - 1
    for t in (2**j for j in range(3, 31)):
        valid = t - kernel + 1
        if valid < 2:
            continue
        n_h = math.ceil(height / valid)
        n_w = math.ceil(width / valid)
        bins = t * (t // 2 + 1)
        # per tile: products ~ bins * 8 (complex MAC, channel factor shared by every t)
        # FFTs ~ t^2 log2 t * 5 / (channels ~ 64) -- a small correction
        cost = n_h * n_w * (bins * 8 + t * t * math.log2(t) * 0.6)
        if cost < best_cost:
            best, best_cost = t, cost
        if t >= span:
            break
    return best


def _spectrum(weight: Tensor, t: int) -> Tensor:
    """Conjugate kernel spectrum, shape (T * (T//2+1), C, O), complex64, cached."""
    with torch.no_grad():
        # in-place changes through ``weight.data`` bump no version counter: a cheap float64
        # fingerprint of the values catches them (~0.1 ms for a 64x64x7x7 kernel)
        # (float64 sums of the float32 values, without a float64 copy of the kernel)
        w = weight.detach()
        fingerprint = (float(w.sum(dtype=torch.float64)),
                       float(torch.linalg.vector_norm(w, dtype=torch.float64)))
    version = -1 if weight.is_inference() else weight._version  # inference tensors have none
    key = (t, weight.device, weight.dtype, version, weight.data_ptr(), weight.shape, fingerprint)
    cached = _SPECTRA.get(id(weight))
    if cached is not None and cached[0]() is weight and cached[1] == key:
        return cached[2]
    with torch.no_grad():
        w64 = weight.detach().to(torch.float64)
        spec = torch.fft.rfft2(w64, s=(t, t)).conj()  # (O, C, T, T//2+1)
        o, c = w64.shape[:2]
        spec = spec.reshape(o, c, -1).permute(2, 1, 0).to(torch.complex64).contiguous()
    ident = id(weight)
    _SPECTRA[ident] = (weakref.ref(weight, lambda _: _SPECTRA.pop(ident, None)), key, spec)
    return spec


def fft_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: int | tuple[int, int]
) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` computed with FFTs (overlap-save tiles).

    :param x: input, shape (N, C, H, W), float32.
    :param weight: kernel, shape (O, C, kh, kw) (square kernels use the best tile size;
        rectangular ones use the larger side).
    :param bias: shape (O,) or None.
    :param padding: zero padding on each side, an int or (ph, pw); stride, dilation and groups
        are 1.
    :returns: shape (N, O, H + 2 ph - kh + 1, W + 2 pw - kw + 1), dtype of ``x``; the
        tiles go through in rows, so that one pass holds at most about 4 x
        :data:`TILE_BYTES` beside the input and output.
    """
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ShapeMismatchError(
            f"fft_conv2d needs an input (N, C, H, W) and a weight (O, C, kh, kw) with the same C "
            f"(got {tuple(x.shape)} and {tuple(weight.shape)}); groups are not supported"
        )
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    out_h, out_w = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    if ph < 0 or pw < 0 or out_h < 1 or out_w < 1:
        raise ShapeMismatchError(
            f"fft_conv2d: padding {padding} with a {kh}x{kw} kernel on a {h}x{w} input gives no "
            "output; use a padding >= 0 that leaves at least one output pixel"
        )
    if n == 0:  # an empty batch (as F.conv2d takes it; MKL's FFT refuses zero transforms)
        return torch.empty(0, o, out_h, out_w, dtype=x.dtype, device=x.device)
    k = max(kh, kw)
    t = tile_size(k, out_h, out_w)
    vh, vw = t - kh + 1, t - kw + 1  # valid outputs per tile
    n_h, n_w = math.ceil(out_h / vh), math.ceil(out_w / vw)
    # zero padding: `padding` before, and enough after for whole tiles
    x = torch.nn.functional.pad(
        x, (pw, n_w * vw + kw - 1 - w - pw, ph, n_h * vh + kh - 1 - h - ph)
    )
    fq = t // 2 + 1
    spectrum = _spectrum(weight, t)
    shift = None
    if bias is not None:
        # a constant added to every output pixel is the DC bin (bin 0) times T^2 (irfft2
        # divides by T^2): no pass over the output maps
        shift = (bias.detach().to(torch.float32) * float(t * t)).to(spectrum.dtype)
    views = x.unfold(2, t, vh).unfold(3, t, vw)  # (N, C, n_h, n_w, T, T), no copy
    out = torch.empty(n, o, out_h, out_w, dtype=x.dtype, device=x.device)
    # rows of tiles at a time, so that the tiles, spectra and products of one pass stay
    # within TILE_BYTES (memory bounded whatever the image size)
    rows = max(1, min(n_h, TILE_BYTES // max(1, 4 * n * n_w * c * t * t)))
    for r0 in range(0, n_h, rows):
        r1 = min(n_h, r0 + rows)
        m = n * (r1 - r0) * n_w  # tiles of this pass
        tiles = views[:, :, r0:r1].permute(0, 2, 3, 1, 4, 5).reshape(m * c, t, t)
        # FFTs over the last two axes of contiguous tiles (fastest), then one copy to put the
        # frequency bins first for the batched (tiles x C) @ (C x O) complex product
        spec_x = torch.fft.rfft2(tiles).view(m, c, t * fq).permute(2, 0, 1).contiguous()
        del tiles
        prod = torch.bmm(spec_x, spectrum)  # (bins, tiles, O)
        del spec_x
        if shift is not None:
            prod[0] += shift
        prod = prod.permute(1, 2, 0).reshape(m * o, t, fq)
        part = torch.fft.irfft2(prod, s=(t, t)).view(n, r1 - r0, n_w, o, t, t)
        del prod
        part = part[..., :vh, :vw]  # the rows and columns no circular wrap-around reaches
        part = part.permute(0, 3, 1, 4, 2, 5).reshape(n, o, (r1 - r0) * vh, n_w * vw)
        top, bottom = r0 * vh, min(out_h, r1 * vh)
        out[:, :, top:bottom] = part[:, :, :bottom - top, :out_w]
    return out
