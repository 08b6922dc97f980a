"""``cka``: centred kernel alignment between layers (one value per layer pair).

Variants, chosen by parameters (Kornblith et al. 2019; Nguyen et al. 2021):

* ``kernel: linear, samples: pixels`` (default): each pixel is a sample and each map a
  feature, so a layer is a (P, C) matrix. Read off the shared moments:
  CKA = ||G_AB||_F^2 / (||G_AA||_F ||G_BB||_F). ``debiased: true`` replaces the three HSIC
  terms by the unbiased estimator in Kornblith et al.'s feature-space form,
  ||G_AB||_F^2 - n/(n-2) sum_p a(p) b(p) + tr(G_AA) tr(G_BB) / ((n-1)(n-2)), where a(p), b(p)
  are the per-pixel centred squared norms of the two layers (accumulated with the moments).
  Pooled over images (``engine.pooled``) it is the same estimator with every pixel of every
  image as a sample, centred on the pooled means (the moments merge exactly).
* ``kernel: rbf, samples: pixels``: a seeded random subsample of ``subsample`` pixel positions
  (the same positions for every layer and model of an image; all pixels when there are no
  more than ``subsample``); Gram matrices over those pixels; biased or debiased HSIC.
* ``samples: images``: each image is a sample; a layer's features are its maps pooled to
  ``size`` x ``size`` (``pool: avg|max``) or flattened (``pool: none``). Computed as minibatch
  CKA (:mod:`mapsim.plugins.metrics.cka_images`): the unbiased HSIC of every layer pair is
  accumulated over consecutive batches of ``batch_size`` images in image order (a last
  remainder of fewer than 4 images joins the batch before it), each batch's Gram matrices
  computed where the maps are (the GPU in a GPU run), and CKA is formed once at the end from
  the sums; per-batch CKA values are never averaged. Only the current batch's features are
  kept, so memory does not grow with the number of images. Batches are weighted by their
  number of images and do not depend on where a run's blocks were cut, nor on the number of
  processes. This needs the unbiased estimator, so ``debiased`` must not be false.
  With ``permutations`` R > 0 (default 999) each value also gets a permutation p-value
  (:meth:`CKAImages.compute`): the cross HSIC is summed again with the images of every batch
  permuted R times (:func:`~mapsim.plugins.metrics.cka_images.batch_permutations`, seeded by
  ``seed`` and the batch's place in the run), and p = (1 + #{CKA_r >= CKA}) / (1 + R).

RBF bandwidth: sigma = ``bandwidth`` x the median pairwise Euclidean distance; by default
(``median: all``) sigma^2 = bandwidth^2 x the median of all n^2 squared distances, zero
diagonal included, exactly as Kornblith et al.'s demo code; ``median: off_diagonal`` leaves
the diagonal out. With images as samples the median is taken within each batch.

Undefined values are reported, never clamped: NaN in ``value`` with one of the reasons in
:mod:`mapsim.plugins.metrics.hsic` (zero variance, too few samples, a non-positive unbiased
self-HSIC, a zero RBF bandwidth).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mapsim import (
    LayerMetric,
    MapsimError,
    Moments,
    Undefined,
    hookimpl,
)
from mapsim.plugins.metrics import hsic
from mapsim.plugins.metrics._cka_common import CKAParams, _CKAFamily
from mapsim.plugins.metrics.cka_images import CKAImages


class CKA(_CKAFamily, LayerMetric):
    """Centred kernel alignment between two layers with pixels as samples: one value per
    layer pair and image. ``samples: images`` gives :class:`CKAImages` instead (see the
    module docstring)."""

    @classmethod
    def create(cls, params: CKAParams, **kwargs: Any) -> CKA | CKAImages:
        """``cka`` with ``samples: images`` is an across-images metric."""
        if params.samples != "images":
            return cls(params)
        from mapsim.plugins.metrics.cka_images import (
            CKAImages,  # it builds on this module
        )

        return CKAImages(params)

    def __init__(self, params: CKAParams | None = None) -> None:
        super().__init__(params)
        if self.params.samples == "images":
            raise MapsimError("cka with samples: images is CKAImages; build it with "
                              "CKA.create(params) (the registry does)")
        self._settle()
        self.uses_moments = self.params.kernel == "linear"
        self.needs_layer_norms = self.uses_moments and self.debiased

    # ------------------------------------------------------------------ pixels as samples
    def from_moments(self, moments: Moments, rows: slice, cols: slice) -> float | Undefined:
        """Linear CKA with pixels as samples, from the co-moments (and layer norms)."""
        g = moments.comoment
        gab, gaa, gbb = g[rows, cols], g[rows, rows], g[cols, cols]
        if not self.debiased:
            return _linear_cka(gab, gaa, gbb)
        if moments.layer_norms is None:
            raise MapsimError(
                "cka with debiased: true needs per-layer norms in the moments; compute them "
                "with compute_moments(z, layers=...)"
            )
        norms = moments.layer_norms
        a, b = moments.layer_index(rows), moments.layer_index(cols)
        return _debiased_linear_cka(gab, gaa, gbb, float(norms[a, b]), float(norms[a, a]),
                                    float(norms[b, b]), moments.n)

    def layers_from_moments(self, moments: Moments, rows: Sequence[slice],
                            cols: Sequence[slice]) -> list[list[float | Undefined]]:
        """Linear CKA of every layer pair at once: block sums of G o G through layer
        indicator matrices (E_r (G o G) E_c^T) and one device -> host transfer."""
        if self.debiased and moments.layer_norms is None:
            return super().layers_from_moments(moments, rows, cols)  # raises the clear error
        g = moments.comoment
        # every block sum of G o G over the layers of both sides comes from one matrix, so
        # that a layer's self term is the very number its cross term with itself is
        union = list(dict.fromkeys((r.start, r.stop) for r in (*rows, *cols)))
        e = _indicator([slice(*u) for u in union], moments.size, g.device)
        blocks = e @ (g * g) @ e.T  # ||G_kl||_F^2
        ir = torch.tensor([union.index((r.start, r.stop)) for r in rows], device=g.device)
        ic = torch.tensor([union.index((c.start, c.stop)) for c in cols], device=g.device)
        cross = blocks[ir][:, ic]
        own = torch.diagonal(blocks)
        traces = e @ torch.diagonal(g)
        parts = [cross.reshape(-1), own[ir], own[ic], traces[ir], traces[ic]]
        if self.debiased:
            ia = torch.tensor([moments.layer_index(r) for r in rows], device=g.device)
            ib = torch.tensor([moments.layer_index(c) for c in cols], device=g.device)
            norms = moments.layer_norms
            parts += [norms[ia][:, ib].reshape(-1), norms[ia, ia], norms[ib, ib]]
        host = torch.cat(parts).cpu().tolist()
        n_r, n_c = len(rows), len(cols)
        sizes = [n_r * n_c, n_r, n_c, n_r, n_c] + ([n_r * n_c, n_r, n_c] if self.debiased else [])
        chunks, offset = [], 0
        for size in sizes:
            chunks.append(host[offset:offset + size])
            offset += size
        cross, saa, sbb, ta, tb = chunks[:5]
        if not self.debiased:
            return [[_linear_cka_values(cross[i * n_c + j], saa[i], sbb[j], ta[i], tb[j])
                     for j in range(n_c)] for i in range(n_r)]
        nab, naa, nbb = chunks[5:]
        return [[_debiased_cka_values(cross[i * n_c + j], saa[i], sbb[j], ta[i], tb[j],
                                      nab[i * n_c + j], naa[i], nbb[j], moments.n)
                 for j in range(n_c)] for i in range(n_r)]

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> float | Undefined:
        """CKA between x (C_a, P) and y (C_b, P) with pixels as samples (generic path)."""
        x, y = x.to(torch.float64), y.to(torch.float64)
        if self.params.kernel == "rbf":
            return self._rbf_pixels(x, y)
        xc = x - x.mean(dim=1, keepdim=True)
        yc = y - y.mean(dim=1, keepdim=True)
        gab, gaa, gbb = xc @ yc.T, xc @ xc.T, yc @ yc.T
        if not self.debiased:
            return _linear_cka(gab, gaa, gbb)
        na, nb = (xc * xc).sum(dim=0), (yc * yc).sum(dim=0)
        return _debiased_linear_cka(gab, gaa, gbb, float(na @ nb), float(na @ na),
                                    float(nb @ nb), x.shape[1])

    def _rbf_pixels(self, x: torch.Tensor, y: torch.Tensor) -> float | Undefined:
        n_pixels = x.shape[1]
        if self.params.subsample < n_pixels:
            generator = torch.Generator().manual_seed(self.params.seed)
            keep = torch.randperm(n_pixels, generator=generator)[: self.params.subsample]
            x, y = x[:, keep.to(x.device)], y[:, keep.to(y.device)]
        return self._cka_of_samples([x.T, y.T], 0, 1)


def _indicator(slices: Sequence[slice], n_maps: int, device: torch.device) -> torch.Tensor:
    """(len(slices), n_maps) float64: 1 where map j is in rows ``slices[l]``."""
    e = torch.zeros(len(slices), n_maps, dtype=torch.float64, device=device)
    for index, s in enumerate(slices):
        e[index, s] = 1.0
    return e


def _linear_cka(gab: torch.Tensor, gaa: torch.Tensor, gbb: torch.Tensor) -> float | Undefined:
    return _linear_cka_values(float((gab * gab).sum()), float((gaa * gaa).sum()),
                              float((gbb * gbb).sum()), float(torch.trace(gaa)),
                              float(torch.trace(gbb)))


def _linear_cka_values(sab: float, saa: float, sbb: float, ta: float,
                       tb: float) -> float | Undefined:
    """Biased linear CKA from ||G_ab||^2, ||G_aa||^2, ||G_bb||^2 and the traces."""
    for t, side in ((ta, "layer_a"), (tb, "layer_b")):
        if t <= 0:
            return Undefined(hsic.ZERO_VARIANCE.format(side=side))
    return sab / math.sqrt(saa * sbb)


def _debiased_linear_cka(gab: torch.Tensor, gaa: torch.Tensor, gbb: torch.Tensor,
                         nab: float, naa: float, nbb: float, n: int) -> float | Undefined:
    return _debiased_cka_values(
        float((gab * gab).sum()), float((gaa * gaa).sum()), float((gbb * gbb).sum()),
        float(torch.trace(gaa)), float(torch.trace(gbb)), nab, naa, nbb, n)


def _debiased_cka_values(sab: float, saa: float, sbb: float, ta: float, tb: float,
                         nab: float, naa: float, nbb: float, n: int) -> float | Undefined:
    """Kornblith et al.'s feature-space unbiased HSIC (times n (n-3), which cancels)."""
    if n < 4:
        return Undefined(hsic.TOO_FEW.format(n=n))
    for t, side in ((ta, "layer_a"), (tb, "layer_b")):
        if t <= 0:
            return Undefined(hsic.ZERO_VARIANCE.format(side=side))

    def scaled_hsic(s: float, cross: float, t1: float, t2: float) -> float:
        return s - n / (n - 2) * cross + t1 * t2 / ((n - 1) * (n - 2))

    hab = scaled_hsic(sab, nab, ta, tb)
    haa = scaled_hsic(saa, naa, ta, ta)
    hbb = scaled_hsic(sbb, nbb, tb, tb)
    for h, side in ((haa, "layer_a"), (hbb, "layer_b")):
        if h <= 0:
            return Undefined(hsic.NOT_POSITIVE.format(side=side, value=h / (n * (n - 3))))
    return hab / math.sqrt(haa * hbb)


@hookimpl
def register_metrics(register) -> None:
    """Register ``cka``."""
    register(CKA)
