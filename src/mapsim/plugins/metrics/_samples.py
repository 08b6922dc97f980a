"""What ``rsa`` and ``mutual_knn`` share: their samples (pixel positions or images).

* pixels as samples: a seeded random subsample of ``subsample`` pixel positions, the same
  positions for both layers of a pair (all pixels when there are no more);
* images as samples: each image's maps pooled to ``size`` x ``size`` (or flattened), kept as
  the declared state of an :class:`mapsim.ImagesMetric`, so blocks, ``--resume`` and torchrun
  work for them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from mapsim import ImagesMetric, Params, ShapeMismatchError, SpecError

KEY_SEP = "\x1f"

_PIXELS_ONLY = ("subsample", "seed")
_IMAGES_ONLY = ("pool", "size")


class SampleParams(Params):
    """The sample parameters of ``rsa`` and ``mutual_knn``."""

    samples: Literal["pixels", "images"] = "pixels"
    """pixels: the pixel positions of one image are the samples (a value per image);
    images: each image is a sample (one value over all images of the run)."""
    subsample: int = Field(1024, ge=4)
    """pixels: positions drawn per image (the pairwise matrices are subsample^2)."""
    seed: int = 0
    """pixels: seed of the position subsample."""
    pool: Literal["avg", "max", "none"] = "avg"
    """images: pool each map to size x size (avg, max) or flatten it whole (none)."""
    size: int = Field(8, ge=1)
    """images: output size of the adaptive pooling."""

    @model_validator(mode="after")
    def _consistent(self) -> SampleParams:
        wrong = _IMAGES_ONLY if self.samples == "pixels" else _PIXELS_ONLY
        for name in wrong:
            if name in self.model_fields_set:
                other = "images" if self.samples == "pixels" else "pixels"
                raise ValueError(f"'{name}' only applies to samples: {other}")
        return self


def pixel_samples(x: torch.Tensor, y: torch.Tensor, params: SampleParams
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(n, C_a) and (n, C_b) float64 arrays: the maps x (C_a, P), y (C_b, P) at the same
    ``subsample`` seeded random positions (all P when P <= subsample)."""
    n_pixels = x.shape[1]
    if params.subsample < n_pixels:
        generator = torch.Generator().manual_seed(params.seed)
        keep = torch.randperm(n_pixels, generator=generator)[: params.subsample]
        keep = torch.sort(keep).values
        x, y = x[:, keep.to(x.device)], y[:, keep.to(y.device)]
    return (x.detach().to(torch.float64).cpu().numpy().T,
            y.detach().to(torch.float64).cpu().numpy().T)


def pooled(maps: torch.Tensor, params: SampleParams, name: str) -> np.ndarray:
    """One image's maps (C, H, W) as a feature vector: pooled to size x size, flattened."""
    if maps.dim() != 3:
        raise ShapeMismatchError(
            f"layer {name!r} gives maps of shape {tuple(maps.shape)}; expected (channels, "
            "height, width)")
    maps = maps.detach().to(torch.float32)
    if params.pool == "avg":
        maps = F.adaptive_avg_pool2d(maps[None], params.size)[0]
    elif params.pool == "max":
        maps = F.adaptive_max_pool2d(maps[None], params.size)[0]
    return maps.reshape(-1).cpu().numpy().astype(np.float64)


class ImageSamples(ImagesMetric):
    """An across-images metric whose samples are the images: the state ``features`` holds
    one pooled feature vector per captured layer and image (keys ``model<US>layer``);
    subclasses implement :meth:`compare` on two (images, features) arrays."""

    params: SampleParams

    def __init__(self, params: SampleParams | None = None) -> None:
        super().__init__(params)
        self.add_state("features", "cat")
        self._shapes: dict[str, tuple[int, ...]] = {}

    def update(self, image_id: str, maps: Mapping[str, Mapping[str, torch.Tensor]],
               mask: torch.Tensor | None = None) -> None:
        """Pool one image's maps into per-layer feature vectors (one state entry)."""
        if mask is not None:
            raise SpecError(
                f"{self.name} with samples: images compares whole maps across images and "
                "cannot be combined with engine.roi; use samples: pixels, or remove engine.roi")
        entry = {}
        for model, layers in maps.items():
            for layer, layer_maps in layers.items():
                key = f"{model}{KEY_SEP}{layer}"
                entry[key] = pooled(layer_maps, self.params, f"{model}.{layer}")
                if self._shapes.setdefault(key, entry[key].shape) != entry[key].shape:
                    raise ShapeMismatchError(
                        f"{self.name} with samples: images and pool: none needs maps of one "
                        f"size across images, but layer {layer!r} of model {model!r} changes "
                        f"size at image {image_id}; use pool: avg or max")
        self.features.append(entry)

    def compute(self, model_a: str, model_b: str) -> dict[tuple[str, str], Any]:
        """The value of every layer pair of two models, over all images seen."""
        if not self.features:
            return {}
        keys = [tuple(k.split(KEY_SEP, 1)) for k in self.features[0]]
        stacked = {key: np.stack([np.asarray(entry[key], dtype=np.float64)
                                  for entry in self.features]) for key in self.features[0]}
        out: dict[tuple[str, str], Any] = {}
        for model, layer in keys:
            if model != model_a:
                continue
            for other_model, other in keys:
                if other_model == model_b:
                    out[(layer, other)] = self.compare(
                        stacked[f"{model}{KEY_SEP}{layer}"],
                        stacked[f"{other_model}{KEY_SEP}{other}"])
        return out

    @abstractmethod
    def compare(self, a: np.ndarray, b: np.ndarray) -> Any:
        """The value between two layers given as (images, features) arrays."""
