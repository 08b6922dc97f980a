"""What the image step gives: one image's results, its moments per comparison group, and the
images in flight on the fast path (:mod:`mapsim.engine.step`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from mapsim.engine.null import NullComparison
from mapsim.engine.similarity import MapStack
from mapsim.types import Moments, SimilarityMatrix

Maps = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class DeadKey:
    """Whose dead maps are counted: one metric's flags on one layer of one model."""

    metric: str
    model: str
    layer: str


@dataclass
class DeadCount:
    """Dead maps summed over images, and how many images were counted."""

    dead: int = 0
    images: int = 0

    def add(self, other: DeadCount) -> None:
        self.dead += other.dead
        self.images += other.images


@dataclass
class DirectionValues:
    """A map metric's values for one direction (model a -> model b), computed where the
    moments are: the dead-map policy applied, and a flag that a live pair has no value."""

    values: torch.Tensor
    undefined: torch.Tensor


@dataclass
class PreparedValues:
    """A group's map-metric values computed ahead (on a GPU: queued behind the forward pass
    and copied to the host without waiting), by metric index."""

    dead: dict[int, torch.Tensor] = field(default_factory=dict)
    directions: dict[tuple[int, str, str], DirectionValues] = field(default_factory=dict)


@dataclass
class GroupMoments:
    """One comparison group's moments for one image."""

    index: int
    models: list[str]
    #: the group's layout (blocks of rows; ``z`` holds no pixels on the fast path)
    stack: MapStack
    #: where the metrics read them (the host, on the fast path)
    moments: Moments
    #: where they were computed (pooled there)
    device_moments: Moments
    prepared: PreparedValues | None = None


@dataclass
class ImageResult:
    """What one image gives: table frames, similarity matrices, its moments per group (to be
    pooled) and its dead-map counts. ``maps`` only when they were asked for."""

    image_id: str
    frames: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    matrices: list[SimilarityMatrix] = field(default_factory=list)
    groups: list[GroupMoments] = field(default_factory=list)
    dead_counts: dict[DeadKey, DeadCount] = field(default_factory=dict)
    maps: Maps | None = None
    #: the matrices under the spatial null (:mod:`mapsim.engine.null`), when it is on
    null: list[SimilarityMatrix] = field(default_factory=list)


@dataclass
class LaunchedImage:
    """An image on the fast path whose values are on their way to the host."""

    image_id: str
    groups: list[GroupMoments]
    #: CUDA events around the image's device work (None on the CPU)
    began: Any = None
    ended: Any = None
    #: the spatial null's shifted comparisons, their moments on their way to the host
    null: list[NullComparison] = field(default_factory=list)
