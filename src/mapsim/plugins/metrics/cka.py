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
  CKA: the unbiased HSIC of every layer pair is accumulated over batches of ``batch_size``
  images (Gram matrices stacked to (L, B, B), all pairs in one einsum) and CKA is formed once
  at the end from the sums; per-batch CKA values are never averaged. Only the current batch's
  features are kept (at most batch_size + 3 images: a last remainder of fewer than 4 images
  joins the batch before it), plus the first image's, to tell a layer that never varies.
  In a run (blocks of images, :mod:`mapsim.runner.blocks`) ``update`` only collects a block's
  pooled features, which ``block_state`` hands over; the batches are formed as the blocks are
  added back in image order (``add_block_state``), so they do not depend on where the images
  were cut, nor on the number of processes.
  Batches are weighted by their number of images. This needs the unbiased estimator, so
  ``debiased`` must not be false.

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
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from mapsim import (
    ImagesMetric,
    LayerMetric,
    MapsimError,
    MetricInfo,
    Moments,
    Params,
    ShapeMismatchError,
    SpecError,
    Undefined,
    hookimpl,
)
from mapsim.plugins.metrics import hsic

#: parameters that only apply to some variants: name -> (applies?, where it applies)
_APPLIES = {
    "bandwidth": (lambda p: p.kernel == "rbf", "kernel: rbf"),
    "median": (lambda p: p.kernel == "rbf", "kernel: rbf"),
    "subsample": (lambda p: p.kernel == "rbf" and p.samples == "pixels",
                  "kernel: rbf with samples: pixels"),
    "seed": (lambda p: p.kernel == "rbf" and p.samples == "pixels",
             "kernel: rbf with samples: pixels"),
    "pool": (lambda p: p.samples == "images", "samples: images"),
    "size": (lambda p: p.samples == "images" and p.pool != "none",
             "samples: images with pool: avg or max"),
    "batch_size": (lambda p: p.samples == "images", "samples: images"),
}


class CKAParams(Params):
    """Parameters of ``cka``."""

    kernel: Literal["linear", "rbf"] = "linear"
    """linear: dot products; rbf: Gaussian kernel with a median-distance bandwidth."""
    samples: Literal["pixels", "images"] = "pixels"
    """pixels: the pixels of one image are the samples (a value per image, and pooled);
    images: each image is a sample (one value over all images, minibatch CKA)."""
    debiased: bool | None = None
    """Use the unbiased HSIC estimator (Song et al. 2012). Default: false for pixels, true for
    images (minibatch CKA requires it)."""
    bandwidth: float = Field(0.5, gt=0)
    """rbf: sigma as a fraction of the median pairwise distance."""
    median: Literal["all", "off_diagonal"] = "all"
    """rbf: median over all n^2 squared distances (Kornblith et al.) or the off-diagonal ones."""
    subsample: int = Field(1024, ge=4)
    """rbf with pixels: pixels drawn per image (Gram matrices are subsample^2)."""
    seed: int = 0
    """rbf with pixels: seed of the pixel subsample."""
    pool: Literal["avg", "max", "none"] = "avg"
    """images: pool each map to size x size (avg, max) or flatten it whole (none)."""
    size: int = Field(8, ge=1)
    """images: output size of the adaptive pooling."""
    batch_size: int = Field(32, ge=4)
    """images: images per minibatch (memory: one batch of features)."""

    @model_validator(mode="after")
    def _consistent(self) -> CKAParams:
        for name, (applies, where) in _APPLIES.items():
            # given at all (even at its default value) but meaningless here: a mistake
            if name in self.model_fields_set and not applies(self):
                raise ValueError(f"'{name}' only applies to {where}")
        if self.samples == "images" and self.debiased is False:
            raise ValueError(
                "samples: images is computed as minibatch CKA, which needs the unbiased HSIC "
                "estimator; drop 'debiased: false'"
            )
        return self


class _CKAFamily:
    """What both kinds of ``cka`` share: parameters, metadata and Gram matrices."""

    name = "cka"
    Params = CKAParams
    info: ClassVar[MetricInfo] = MetricInfo(
        granularity="layer", higher_is_more_similar=True, symmetric=True,
        value_range=(0.0, 1.0), invariances=("orthogonal", "scale", "shift", "sign"),
    )
    examples = (
        {},
        {"debiased": True},
        {"kernel": "rbf", "subsample": 64, "seed": 3},
        {"kernel": "rbf", "debiased": True, "subsample": 64, "median": "off_diagonal"},
        {"samples": "images", "size": 2},
        {"samples": "images", "pool": "max", "size": 2, "batch_size": 4},
        {"samples": "images", "pool": "none"},
        {"samples": "images", "kernel": "rbf", "size": 2},
    )
    params: CKAParams

    def _settle(self) -> None:
        p = self.params
        self.debiased = p.debiased if p.debiased is not None else p.samples == "images"
        invariances = ("orthogonal", "scale", "shift", "sign")
        if p.samples == "images" and p.pool == "max":  # max pooling is not linear
            invariances = ("scale", "shift")
        low = -1.0 if self.debiased else 0.0  # an unbiased HSIC can be negative
        self.info = MetricInfo("layer", True, True, (low, 1.0), invariances)

    def _cka_of_samples(self, features: list[torch.Tensor], a: int, b: int) -> float | Undefined:
        """CKA between two (n, D) feature matrices of the same samples."""
        n = features[0].shape[0]
        if self.debiased and n < 4:
            return Undefined(hsic.TOO_FEW.format(n=n))
        grams, reasons = self._grams(features)
        estimate = hsic.hsic_unbiased(grams) if self.debiased else hsic.hsic_biased(grams)
        return hsic.cka_value(estimate, a, b, reasons, self.debiased)

    def _grams(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[str | None]]:
        """(L, n, n) Gram matrices and, per layer, the reason it is undefined (or None)."""
        grams, reasons = [], []
        n = features[0].shape[0]
        for x in features:
            gram, reason = None, None
            if hsic.is_constant(x):
                reason = hsic.ZERO_VARIANCE
            elif self.params.kernel == "linear":
                gram = hsic.linear_gram(x)
            else:
                gram = hsic.rbf_gram(x, self.params.bandwidth, self.params.median)
                reason = hsic.ZERO_BANDWIDTH if gram is None else None
            grams.append(gram if gram is not None else torch.zeros(
                n, n, dtype=torch.float64, device=x.device))
            reasons.append(reason)
        return torch.stack(grams), reasons


class CKA(_CKAFamily, LayerMetric):
    """Centred kernel alignment between two layers with pixels as samples: one value per
    layer pair and image. ``samples: images`` gives :class:`CKAImages` instead (see the
    module docstring)."""

    @classmethod
    def create(cls, params: CKAParams, **kwargs: Any) -> CKA | CKAImages:
        """``cka`` with ``samples: images`` is an across-images metric."""
        return CKAImages(params) if params.samples == "images" else cls(params)

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


KEY_SEP = "\x1f"


class CKAImages(_CKAFamily, ImagesMetric):
    """Minibatch CKA with images as samples: one value per layer pair over all images.

    The declared state ``features`` holds, per image, the pooled feature vector of every
    captured layer (keys ``model<US>layer``). :meth:`merge` forms the minibatches as the
    images arrive in order and keeps only the HSIC sums and the current batch, so the values
    do not depend on where blocks were cut, nor on the number of processes.
    """

    def __init__(self, params: CKAParams | None = None) -> None:
        super().__init__(params)
        self._settle()
        self.add_state("features", "cat")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._keys: list[str] = []
        self._buffer: list[list[torch.Tensor]] = []
        self._sum: torch.Tensor | None = None
        self._weight = 0
        self._seen = 0
        self._varies: list[bool] = []
        self._first: list[torch.Tensor] = []
        self._reasons: list[str | None] = []

    def update(self, image_id: str, maps: Mapping[str, Mapping[str, torch.Tensor]],
               mask: torch.Tensor | None = None) -> None:
        """Pool one image's maps into per-layer feature vectors (one state entry)."""
        if mask is not None:
            raise SpecError(
                "cka with samples: images compares whole maps across images and cannot be "
                "combined with engine.roi; use samples: pixels, or remove engine.roi"
            )
        self.features.append({
            f"{model}{KEY_SEP}{layer}": self._pooled(layer_maps, image_id, model, layer)
            for model, layers in maps.items() for layer, layer_maps in layers.items()})

    def merge(self, states: Mapping[str, Any]) -> None:
        """Take in images' features in order, forming the minibatches as they fill."""
        for entry in states["features"]:
            self._take(entry, "of a block")

    def compute(self, model_a: str, model_b: str) -> dict[tuple[str, str], Any]:
        """CKA of every layer pair of two models from the HSIC sums of all batches."""
        pending, self.features = self.features, []
        self.merge({"features": pending})  # images given to update() here, not in blocks
        if self._buffer and self._seen >= 4:
            if len(self._buffer) < 4:
                raise MapsimError("cka: images were added after finish(); start a new metric")
            self._add_batch(self._buffer)
            self._buffer = []
        keys = [tuple(k.split(KEY_SEP, 1)) for k in self._keys]
        layers_a = [i for i, k in enumerate(keys) if k[0] == model_a]
        layers_b = [i for i, k in enumerate(keys) if k[0] == model_b]
        reasons = [r if r is not None else (None if v else hsic.ZERO_VARIANCE)
                   for r, v in zip(self._reasons, self._varies)]
        out: dict[tuple[str, str], Any] = {}
        for a in layers_a:
            for b in layers_b:
                key = (keys[a][1], keys[b][1])
                if self._seen < 4:
                    out[key] = Undefined(hsic.TOO_FEW.format(n=self._seen))
                else:
                    out[key] = hsic.cka_value(self._sum / self._weight, a, b, reasons, True)
        return out

    def _take(self, entry: Mapping[str, Any], image_id: str) -> None:
        """Add one image's feature vectors (one per layer) to the current batch."""
        keys = list(entry)
        if not self._keys:
            self._keys = keys
            self._varies = [False] * len(keys)
            self._reasons = [None] * len(keys)
        elif keys != self._keys:
            raise MapsimError(f"image {image_id} gave other layers than the images before it")
        features = [torch.as_tensor(entry[k]) for k in keys]
        for index, vector in enumerate(features):
            if len(self._first) <= index:
                self._first.append(vector)
            elif not self._varies[index] and not torch.equal(vector, self._first[index]):
                self._varies[index] = True
        self._buffer.append(features)
        self._seen += 1
        if len(self._buffer) == self.params.batch_size + 4:
            self._add_batch(self._buffer[: self.params.batch_size])
            self._buffer = self._buffer[self.params.batch_size:]

    def _pooled(self, maps: torch.Tensor, image_id: str, model: str,
                layer: str) -> torch.Tensor:
        if maps.dim() != 3:
            raise ShapeMismatchError(
                f"layer {layer!r} of model {model!r} gives maps of shape {tuple(maps.shape)}; "
                "cka expects (channels, height, width)"
            )
        maps = maps.detach().to(torch.float32)
        size = self.params.size
        if self.params.pool == "avg":
            maps = F.adaptive_avg_pool2d(maps[None], size)[0]
        elif self.params.pool == "max":
            maps = F.adaptive_max_pool2d(maps[None], size)[0]
        shape = tuple(maps.shape)
        key = f"{model}{KEY_SEP}{layer}"
        if self._shapes.setdefault(key, shape) != shape:
            raise ShapeMismatchError(
                f"cka with samples: images and pool: none needs maps of one size across "
                f"images, but layer {layer!r} of model {model!r} is {self._shapes[key]} "
                f"before image {image_id} and {shape} in it; use pool: avg or max"
            )
        return maps.reshape(-1).cpu()

    def _add_batch(self, batch: list[list[torch.Tensor]]) -> None:
        """Add the unbiased HSIC of every layer pair over one batch of images."""
        features = [torch.stack([image[i] for image in batch]) for i in range(len(self._keys))]
        grams, reasons = self._grams(features)
        for index, reason in enumerate(reasons):
            # a layer constant within a batch is fine (its HSIC is 0 there); a zero bandwidth
            # is not: the kernel is undefined, so the layer's values are too
            if reason == hsic.ZERO_BANDWIDTH:
                self._reasons[index] = reason
        estimate = hsic.hsic_unbiased(grams) * len(batch)
        self._sum = estimate if self._sum is None else self._sum + estimate
        self._weight += len(batch)


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
