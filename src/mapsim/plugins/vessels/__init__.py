"""The ``synthetic-vessels`` dataset: fluorescence-like vessel images with exact labels.

Image ``i`` of seed ``s`` is drawn from its own ``numpy.random.RandomState`` seeded with
``(s, i)`` (one stream for the geometry, one for the appearance), so it is the same whatever
``count`` is, and the same on every numpy version (the legacy RandomState streams are frozen).
See :mod:`.geometry` for the vessel trees and :mod:`.render` for the image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from mapsim import Dataset, ImageItem, hookimpl, normalise_image
from mapsim import Params as BaseParams
from mapsim.plugins.vessels.geometry import (
    GeometryParams,
    Segment,
    VesselGeometry,
    generate_geometry,
)
from mapsim.plugins.vessels.render import AppearanceParams, rasterise, render

__all__ = [
    "AppearanceParams", "GeometryParams", "Segment", "SyntheticVessels", "VesselGeometry",
    "VesselSample", "generate", "image_id", "random_state",
]

#: mixed into every seed so these streams differ from other uses of the same seed
_TAG = 0x76657373  # "vess"

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


def random_state(seed: int, index: int, stream: int) -> np.random.RandomState:
    """The legacy RandomState of image ``index`` of ``seed`` (stream 0: geometry, 1: appearance)."""
    return np.random.RandomState([_TAG, int(seed), int(index), int(stream)])


def image_id(seed: int, index: int) -> str:
    """The id of image ``index`` of ``seed``, e.g. ``synthetic-s7-i0003``."""
    return f"synthetic-s{seed}-i{index:04d}"


@dataclass
class VesselSample:
    """One synthetic image: the raw rendering (float32 (H, W)), its label and its geometry."""

    id: str
    raw: np.ndarray
    label: np.ndarray
    geometry: VesselGeometry


def generate(
    seed: int, index: int, size: tuple[int, int] = (256, 256),
    geometry: GeometryParams | None = None, appearance: AppearanceParams | None = None,
    *, image: bool = True,
) -> VesselSample:
    """Image ``index`` of ``seed``: raw rendering, exact label and the trees it was drawn from.

    ``image=False`` skips the rendering (``raw`` is then an empty array): the label and the
    geometry alone are much cheaper.
    """
    gp = geometry or GeometryParams()
    ap = appearance or AppearanceParams()
    geo = generate_geometry(size, gp, random_state(seed, index, 0))
    label, chord = rasterise(geo)
    raw = np.zeros((0, 0), dtype=np.float32)
    if image:
        reference = 0.5 * (gp.trunk_radius[0] + gp.trunk_radius[1])
        raw = render(chord, ap, random_state(seed, index, 1), reference_radius=reference)
    return VesselSample(image_id(seed, index), raw, label, geo)


class SyntheticVessels(Dataset):
    """Synthetic 2D fluorescence-like blood-vessel images with exact binary labels."""

    name = "synthetic-vessels"

    class Params(BaseParams):
        """Parameters of the ``synthetic-vessels`` dataset.

        count: number of images; start: index of the first (images start..start+count-1).
        size: [height, width] in pixels. seed: the image set (0 <= seed < 2**32).
        normalise: per-image intensity normalisation (as for the ``files`` dataset).
        The other fields shape the vessels (radii in pixels) and their appearance; see
        :class:`GeometryParams` and :class:`AppearanceParams`.
        """

        count: int = Field(8, ge=1)
        start: int = Field(0, ge=0)
        size: tuple[Annotated[int, Field(ge=16)], Annotated[int, Field(ge=16)]] = (256, 256)
        seed: int = Field(0, ge=0, lt=2**32)
        normalise: Literal["zscore", "minmax", "none"] = "zscore"
        trunk_radius: tuple[PositiveFloat, PositiveFloat] = (4.0, 7.0)
        min_radius: float = Field(1.5, ge=0.5)
        vessel_fraction: tuple[
            Annotated[float, Field(gt=0, lt=1)], Annotated[float, Field(gt=0, lt=1)]
        ] = (0.10, 0.20)
        tortuosity: NonNegativeFloat = 0.35
        gamma: PositiveFloat = 0.6
        blur: NonNegativeFloat = 1.5
        background: NonNegativeFloat = 0.18
        texture: NonNegativeFloat = 0.15
        illumination: Annotated[float, Field(ge=0, lt=1)] = 0.6
        photons: PositiveFloat = 10.0
        read_noise: NonNegativeFloat = 0.02

        @model_validator(mode="after")
        def _ranges(self) -> SyntheticVessels.Params:
            for name in ("trunk_radius", "vessel_fraction"):
                lo, hi = getattr(self, name)
                if lo > hi:
                    raise ValueError(f"{name}: the first value ({lo}) must not exceed the "
                                     f"second ({hi}); give [low, high].")
            if self.min_radius > self.trunk_radius[0]:
                raise ValueError(f"min_radius ({self.min_radius}) must not exceed the smallest "
                                 f"trunk radius ({self.trunk_radius[0]}).")
            return self

    params: SyntheticVessels.Params

    def geometry_params(self) -> GeometryParams:
        """The geometry part of the parameters."""
        p = self.params
        return GeometryParams(trunk_radius=tuple(p.trunk_radius), min_radius=p.min_radius,
                              vessel_fraction=tuple(p.vessel_fraction), tortuosity=p.tortuosity)

    def appearance_params(self) -> AppearanceParams:
        """The appearance part of the parameters."""
        p = self.params
        return AppearanceParams(gamma=p.gamma, blur=p.blur, background=p.background,
                                texture=p.texture, illumination=p.illumination,
                                photons=p.photons, read_noise=p.read_noise)

    def sample(self, i: int) -> VesselSample:
        """The raw sample of the ``i``-th image of this dataset (index ``start + i``)."""
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} of a dataset of {len(self)}")
        p = self.params
        return generate(p.seed, p.start + i, tuple(p.size), self.geometry_params(),
                        self.appearance_params())

    def __getitem__(self, i: int) -> ImageItem:
        """The ``i``-th image, normalised, as a model input with its label."""
        s = self.sample(i)
        return ImageItem(
            id=s.id,
            image=normalise_image(s.raw[np.newaxis], self.params.normalise),
            label=s.label,
            source=f"synthetic-vessels(seed={self.params.seed}, index={self.params.start + i})",
        )

    def __len__(self) -> int:
        """Number of images."""
        return self.params.count

    def __iter__(self) -> Iterator[ImageItem]:
        """The images in index order, generated one at a time."""
        for i in range(len(self)):
            yield self[i]

    def slice(self, start: int, stop: int) -> Iterator[ImageItem]:
        """Images ``start`` to ``stop - 1``, read one at a time (random access)."""
        for i in range(max(start, 0), min(stop, len(self))):
            yield self[i]


@hookimpl
def register_datasets(register):
    """Register the ``synthetic-vessels`` dataset."""
    register(SyntheticVessels)
