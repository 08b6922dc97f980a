"""Compensation: replace a removed map by an affine function of a kept one (DESIGN.md s. 10).

The maps of a conv module (after its ReLU) feed the next convolution, which is linear in them.
If map j is, over the calibration pixels, close to ``a * m_i + b`` with

    a = cov(i, j) / var(i),   b = mean_j - a * mean_i

(the least-squares line, read off :class:`~mapsim.Moments`: ``a = G_ij / G_ii``), then
removing j and folding its outgoing weights into the next layer,

    W[:, i] += a * W[:, j]          (every kernel tap)
    bias    += b * sum_taps W[:, j]  (per output channel)

changes the next layer's output by ``-conv(e, W[:, j])`` with the residual
``e = m_j - a m_i - b``: nothing when the relation is exact. A partner with zero variance (a
dead map) gets ``a = 0`` and ``b = mean_j`` -- a constant map is always exactly replaced.

**Zero padding.** The bias term stands for the constant ``b`` feeding every kernel tap. At a
pixel closer than ``k // 2`` to the border some taps read the zero padding, where the original
map contributed nothing, so there the output differs by ``b`` times the sum of the taps of
``W[:, j]`` that fall outside the image. The output is exact in the interior (and everywhere for
1x1 kernels, e.g. the ``fcn`` head); :func:`border_error` gives the difference at the border.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from mapsim.types import Moments

#: a map whose variance is at most this fraction of the largest variance counts as constant
CONSTANT_RELATIVE_VARIANCE = 1e-20


def affine_fit(moments: Moments, kept: int, removed: int) -> tuple[float, float]:
    """``(a, b)`` of the least-squares line ``m_removed ~ a * m_kept + b`` (float64).

    A kept map that is constant over the pixels gives ``a = 0`` and ``b = mean_removed``.
    """
    g = moments.comoment
    var = float(g[kept, kept])
    scale = float(torch.diagonal(g).max()) if g.numel() else 0.0
    if var <= CONSTANT_RELATIVE_VARIANCE * max(scale, 1e-300):
        return 0.0, float(moments.mean[removed])
    a = float(g[kept, removed]) / var
    return a, float(moments.mean[removed]) - a * float(moments.mean[kept])


@torch.no_grad()
def fold(next_conv: torch.nn.Conv2d, partners: Mapping[int, int], moments: Moments,
         index: Mapping[int, int] | None = None) -> dict:
    """Fold each removed map j into its kept partner i in ``next_conv``, in place.

    ``partners`` maps removed -> kept maps of the previous layer, numbered as ``moments`` (the
    maps' moments); ``index`` maps that numbering to ``next_conv``'s input channels (default:
    the same numbers; through a concatenation, shifted by the offset). The sums are done in
    float64. The removed input channels keep their (now redundant) weights: remove them
    afterwards (:mod:`mapsim.pruning.graph`). Returns ``{j: {"partner": i, "a": a, "b": b}}``.
    """
    index = index if index is not None else {k: k for k in range(next_conv.in_channels)}
    bad = [i for i in partners.values() if i in partners]
    if bad:
        raise ValueError(f"compensation partners {sorted(set(bad))} are removed themselves; "
                         "a partner must be a kept map")
    if next_conv.bias is None:
        raise ValueError("compensation needs a bias in the next convolution to fold b into")
    w = next_conv.weight.double()
    bias = next_conv.bias.double()
    record = {}
    for j, i in sorted(partners.items()):
        a, b = affine_fit(moments, i, j)
        w[:, index[i]] += a * w[:, index[j]]
        bias += b * w[:, index[j]].sum(dim=(1, 2))
        record[int(j)] = {"partner": int(i), "a": a, "b": b}
    next_conv.weight.copy_(w.to(next_conv.weight.dtype))
    next_conv.bias.copy_(bias.to(next_conv.bias.dtype))
    return record


def border_error(next_weight: torch.Tensor, removed: int, b: float, height: int, width: int,
                 padding: int) -> torch.Tensor:
    """(C_out, H, W) float64 output difference (compensated minus original) that zero padding
    leaves when the residual is zero: ``b * (sum of taps of W[:, removed] - those that read
    inside the image)``; zero at every pixel whose whole kernel window is inside the image."""
    w = next_weight[:, removed:removed + 1].double()
    ones = torch.ones(1, 1, height, width, dtype=torch.float64)
    inside = F.conv2d(ones, w, padding=padding)[0]
    return b * (w.sum(dim=(1, 2, 3))[:, None, None] - inside)


def residual_fraction(moments: Moments, kept: int, removed: int) -> float:
    """Share of map ``removed``'s variance the affine fit leaves, ``1 - r^2`` (0 for a
    constant map)."""
    g = moments.comoment.double()
    vj, vi = float(g[removed, removed]), float(g[kept, kept])
    if vj <= 0:
        return 0.0
    if vi <= 0:
        return 1.0
    return float(max(0.0, 1.0 - g[kept, removed] ** 2 / (vi * vj)))


__all__ = ["affine_fit", "border_error", "fold", "residual_fraction"]
