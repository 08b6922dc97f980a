"""What both kinds of ``cka`` share: the parameters and the Gram matrices of samples
(:mod:`mapsim.plugins.metrics.cka` with pixels as samples,
:mod:`mapsim.plugins.metrics.cka_images` with images as samples)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from mapsim import MetricInfo, Params, Undefined
from mapsim.plugins.metrics import hsic

#: parameters that only apply to some variants: name -> (applies?, where it applies)
_APPLIES = {
    "bandwidth": (lambda p: p.kernel == "rbf", "kernel: rbf"),
    "median": (lambda p: p.kernel == "rbf", "kernel: rbf"),
    "subsample": (lambda p: p.kernel == "rbf" and p.samples == "pixels",
                  "kernel: rbf with samples: pixels"),
    "seed": (lambda p: (p.kernel == "rbf" and p.samples == "pixels")
             or (p.samples == "images" and p.permutations > 0),
             "kernel: rbf with samples: pixels, or samples: images with permutations > 0"),
    "pool": (lambda p: p.samples == "images", "samples: images"),
    "size": (lambda p: p.samples == "images" and p.pool != "none",
             "samples: images with pool: avg or max"),
    "batch_size": (lambda p: p.samples == "images", "samples: images"),
    "permutations": (lambda p: p.samples == "images", "samples: images"),
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
    """rbf with pixels: seed of the pixel subsample; images: seed of the permutations."""
    pool: Literal["avg", "max", "none"] = "avg"
    """images: pool each map to size x size (avg, max) or flatten it whole (none)."""
    size: int = Field(8, ge=1)
    """images: output size of the adaptive pooling."""
    batch_size: int = Field(32, ge=4)
    """images: images per minibatch (memory: one batch of features)."""
    permutations: int = Field(999, ge=0, le=100_000)
    """images: permutations of the images (within each batch) for the p-value of each CKA
    value (column ``p`` of layer_similarity.csv); 0: no p-value."""

    @model_validator(mode="after")
    def _consistent(self) -> CKAParams:
        for name, (applies, where) in _APPLIES.items():
            # given at all (even at its default value) but meaningless here: a mistake
            if name in self.model_fields_set and not applies(self):
                raise ValueError(f"'{name}' only applies to {where}")
        if self.samples == "images" and self.permutations > 0 and self.seed < 0:
            raise ValueError(f"'seed' of the permutations must be >= 0, got {self.seed}")
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
