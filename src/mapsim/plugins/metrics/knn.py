"""``mutual_knn``: mutual k-nearest-neighbour agreement between layers (Huh et al. 2024).

For every sample, its k nearest other samples are found in each layer's representation; the
value is the mean, over samples, of the fraction of the k neighbours the two layers share
(|N_a(i) ∩ N_b(i)| / k, in [0, 1]; 1 when the neighbourhoods agree everywhere).

* samples: ``pixels`` (default; ``subsample`` seeded positions of one image, each the vector
  of the layer's C map values; one value per image) or ``images`` (each image's maps pooled
  to ``size`` x ``size``; one value over all images of the run);
* ``distance``: ``euclidean`` (default) or ``cosine`` (Huh et al. compare L2-normalised
  features by inner product, which ranks neighbours as the cosine distance does; a sample
  that is all zero in either layer has no direction and is left out);
* distances are rounded to 1e-6 of the largest (the maps are float32) and equal ones are
  broken by sample order (a stable sort), so the value is reproducible and exact ties (e.g.
  patterns with one active map) are not reordered by rounding.

Undefined when there are no more than k samples.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from scipy.spatial.distance import pdist, squareform

from mapsim import LayerMetric, MetricInfo, Undefined, hookimpl
from mapsim.plugins.metrics._samples import ImageSamples, SampleParams, pixel_samples

TOO_FEW = "too few samples: n={n} <= k={k} neighbours"


class KNNParams(SampleParams):
    """Parameters of ``mutual_knn``."""

    k: int = Field(10, ge=1)
    """Neighbours per sample."""
    distance: Literal["euclidean", "cosine"] = "euclidean"
    """How neighbours are ranked."""


def neighbours(samples: np.ndarray, k: int, distance: str) -> np.ndarray:
    """(n, k) indices of each sample's k nearest other samples (ties: lower index first)."""
    d = squareform(pdist(samples, distance))
    # the maps are float32: distances are compared on a grid of 1e-6 of the largest, so
    # that rounding does not reorder samples that are equally near (e.g. patterns with
    # one active map, collinear at cosine distance 0, after a rotation of the maps)
    largest = d.max()
    if largest > 0:
        d = np.round(d / largest, 6)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def mutual_knn(a: np.ndarray, b: np.ndarray, k: int, distance: str) -> float | Undefined:
    """Mutual k-NN agreement of two layers given as (n, C_a), (n, C_b) arrays of the same
    samples."""
    if distance == "cosine":  # an all-zero sample has no direction
        keep = (np.abs(a).sum(axis=1) > 0) & (np.abs(b).sum(axis=1) > 0)
        a, b = a[keep], b[keep]
    n = len(a)
    if n <= k:
        return Undefined(TOO_FEW.format(n=n, k=k))
    members = []
    for samples in (a, b):
        m = np.zeros((n, n), dtype=bool)
        np.put_along_axis(m, neighbours(samples, k, distance), True, axis=1)
        members.append(m)
    return float((members[0] & members[1]).sum(axis=1).mean() / k)


class _KNNFamily:
    """Parameters and metadata shared by both kinds of ``mutual_knn``."""

    name = "mutual_knn"
    Params = KNNParams
    info: ClassVar[MetricInfo] = MetricInfo(
        granularity="layer", higher_is_more_similar=True, symmetric=True,
        value_range=(0.0, 1.0), invariances=("orthogonal", "scale", "shift", "sign"),
    )
    examples = (
        {},
        {"k": 3, "distance": "cosine"},
        {"k": 5, "subsample": 50, "seed": 1},
        {"samples": "images", "k": 3, "size": 2},
    )
    params: KNNParams

    def _settle(self) -> None:
        p = self.params
        linear = p.samples == "pixels" or p.pool != "max"  # max pooling is not linear
        if p.distance == "euclidean":
            invariances = ("orthogonal", "scale", "shift", "sign") if linear else (
                "scale", "shift")
        else:
            invariances = ("orthogonal", "scale", "sign") if linear else ("scale",)
        self.info = MetricInfo("layer", True, True, (0.0, 1.0), invariances)


class MutualKNN(_KNNFamily, LayerMetric):
    """Mutual k-NN agreement with pixel positions as samples: one value per layer pair and
    image. ``samples: images`` gives :class:`MutualKNNImages`."""

    @classmethod
    def create(cls, params: KNNParams, **kwargs: Any) -> MutualKNN | MutualKNNImages:
        """``mutual_knn`` with ``samples: images`` is an across-images metric."""
        return MutualKNNImages(params) if params.samples == "images" else cls(params)

    def __init__(self, params: KNNParams | None = None) -> None:
        super().__init__(params)
        self._settle()

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> float | Undefined:
        """Agreement between x (C_a, P) and y (C_b, P) over subsampled pixel positions."""
        a, b = pixel_samples(x, y, self.params)
        return mutual_knn(a, b, self.params.k, self.params.distance)


class MutualKNNImages(_KNNFamily, ImageSamples):
    """Mutual k-NN agreement with images as samples, over all images of a run."""

    def __init__(self, params: KNNParams | None = None) -> None:
        super().__init__(params)
        self._settle()

    def compare(self, a: np.ndarray, b: np.ndarray) -> float | Undefined:
        return mutual_knn(a, b, self.params.k, self.params.distance)


@hookimpl
def register_metrics(register) -> None:
    """Register ``mutual_knn``."""
    register(MutualKNN)
