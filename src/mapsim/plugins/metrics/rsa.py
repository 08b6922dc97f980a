"""``rsa``: representational similarity analysis between layers (Kriegeskorte et al. 2008).

Each layer gives a representational dissimilarity matrix (RDM) over the same samples; the
value is the correlation of the two RDMs' upper triangles (the condensed vectors).

* samples: ``pixels`` (default; a seeded subsample of ``subsample`` positions of one image,
  each a vector of the layer's C map values; one value per image) or ``images`` (each image's
  maps pooled to ``size`` x ``size`` and flattened; one value over all images of the run);
* ``dissimilarity``: ``euclidean`` (squared Euclidean distance divided by the number of
  features, rsatoolbox's ``euclidean``) or ``correlation`` (1 - Pearson between two
  samples' patterns; a sample whose pattern is constant in either layer has no correlation
  and is left out of both RDMs);
* ``compare``: ``spearman`` (default; rank correlation, ties averaged) or ``pearson``
  (rsatoolbox's ``spearman`` and ``corr``).

Undefined values say why: fewer than 3 samples, or an RDM whose entries are all equal.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from scipy.spatial.distance import pdist
from scipy.stats import rankdata

from mapsim import LayerMetric, MetricInfo, Undefined, hookimpl
from mapsim.plugins.metrics._samples import ImageSamples, SampleParams, pixel_samples

TOO_FEW = "too few samples: n={n} < 3 (RSA compares at least 3 dissimilarities)"
FLAT = "every dissimilarity of {side} is equal: its RDM has no variance"


class RSAParams(SampleParams):
    """Parameters of ``rsa``."""

    dissimilarity: Literal["euclidean", "correlation"] = "euclidean"
    """euclidean: squared distance / features; correlation: 1 - Pearson of the patterns."""
    compare: Literal["spearman", "pearson"] = "spearman"
    """How the two RDMs are compared."""


def rdm(samples: np.ndarray, dissimilarity: str) -> np.ndarray:
    """The condensed RDM (upper triangle, row by row) of (n, features) ``samples``."""
    if dissimilarity == "euclidean":
        return pdist(samples, "sqeuclidean") / samples.shape[1]
    return pdist(samples, "correlation")


def rsa_value(a: np.ndarray, b: np.ndarray, dissimilarity: str,
              compare: str) -> float | Undefined:
    """RSA between two layers given as (n, C_a) and (n, C_b) arrays of the same samples."""
    if dissimilarity == "correlation":  # constant patterns have no correlation distance
        keep = (np.ptp(a, axis=1) > 0) & (np.ptp(b, axis=1) > 0)
        a, b = a[keep], b[keep]
    if len(a) < 3:
        return Undefined(TOO_FEW.format(n=len(a)))
    vectors = []
    for side, samples in (("layer_a", a), ("layer_b", b)):
        v = rdm(samples, dissimilarity)
        if np.ptp(v) <= 0:
            return Undefined(FLAT.format(side=side))
        vectors.append(rankdata(v) if compare == "spearman" else v)
    u, v = (w - w.mean() for w in vectors)
    return float(np.clip(u @ v / np.sqrt((u @ u) * (v @ v)), -1.0, 1.0))


class _RSAFamily:
    """Parameters and metadata shared by both kinds of ``rsa``."""

    name = "rsa"
    Params = RSAParams
    info: ClassVar[MetricInfo] = MetricInfo(
        granularity="layer", higher_is_more_similar=True, symmetric=True,
        value_range=(-1.0, 1.0), invariances=("orthogonal", "scale", "shift", "sign"),
    )
    examples = (
        {},
        {"dissimilarity": "correlation", "compare": "pearson"},
        {"subsample": 40, "seed": 2},
        {"samples": "images", "size": 2},
        {"samples": "images", "pool": "max", "size": 2, "dissimilarity": "correlation"},
    )
    params: RSAParams

    def _settle(self) -> None:
        p = self.params
        linear = p.samples == "pixels" or p.pool != "max"  # max pooling is not linear
        if p.dissimilarity == "euclidean":
            invariances = ("orthogonal", "scale", "shift", "sign") if linear else (
                "scale", "shift")
        else:
            invariances = ("scale", "sign") if linear else ("scale",)
        self.info = MetricInfo("layer", True, True, (-1.0, 1.0), invariances)


class RSA(_RSAFamily, LayerMetric):
    """RSA with pixel positions as samples: one value per layer pair and image.
    ``samples: images`` gives :class:`RSAImages` (see the module docstring)."""

    @classmethod
    def create(cls, params: RSAParams, **kwargs: Any) -> RSA | RSAImages:
        """``rsa`` with ``samples: images`` is an across-images metric."""
        return RSAImages(params) if params.samples == "images" else cls(params)

    def __init__(self, params: RSAParams | None = None) -> None:
        super().__init__(params)
        self._settle()

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> float | Undefined:
        """RSA between x (C_a, P) and y (C_b, P) over subsampled pixel positions."""
        a, b = pixel_samples(x, y, self.params)
        return rsa_value(a, b, self.params.dissimilarity, self.params.compare)


class RSAImages(_RSAFamily, ImageSamples):
    """RSA with images as samples: one value per layer pair over all images of a run."""

    def __init__(self, params: RSAParams | None = None) -> None:
        super().__init__(params)
        self._settle()

    def compare(self, a: np.ndarray, b: np.ndarray) -> float | Undefined:
        return rsa_value(a, b, self.params.dissimilarity, self.params.compare)


@hookimpl
def register_metrics(register) -> None:
    """Register ``rsa``."""
    register(RSA)
