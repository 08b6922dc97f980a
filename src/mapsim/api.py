"""The base classes a plugin subclasses: one per registry.

Every plugin is a class with a ``name`` and a pydantic ``Params`` model (``extra="forbid"``);
mapsim builds the spec schema from those models and constructs the plugin as
``PluginClass(params)``. A plugin module registers its classes from a hook implementation::

    from mapsim import hookimpl

    @hookimpl
    def register_metrics(register):
        register(MyMetric)
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from mapsim.errors import MapsimError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    from torch import nn

    from mapsim.engine.moments import Moments
    from mapsim.engine.similarity import SimilarityMatrix


class MetricPathError(MapsimError):
    """A metric was asked for a computation path it does not implement."""


class Params(BaseModel):
    """Base of every plugin's parameter model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin(ABC):
    """Common shape of every registered thing."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params | None = None) -> None:
        self.params = params if params is not None else type(self).Params()


# --------------------------------------------------------------------------- architectures
class Architecture(Plugin):
    """Builds an ``nn.Module`` from its parameters (weights are loaded by the core)."""

    @abstractmethod
    def build(self) -> nn.Module:
        """A new model with freshly initialised weights."""

    def in_channels(self) -> int:
        """Number of input channels the built model expects."""
        return 1


# --------------------------------------------------------------------------- extractors
class Extractor(Plugin):
    """Captures the outputs of named layers of a model for a batch of inputs."""

    @abstractmethod
    def layer_names(self, model: nn.Module) -> list[str]:
        """Every layer path this extractor can capture, in model order."""

    @abstractmethod
    def extract(
        self, model: nn.Module, layers: Sequence[str], inputs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Return ``{layer path: detached output}`` for the exact paths in ``layers``."""


# --------------------------------------------------------------------------- datasets
@dataclass
class ImageItem:
    """One input image, ready for a model.

    ``image`` is float32 with shape (channels, height, width), already normalised;
    ``label`` is an optional boolean (height, width) mask (used for ROI restriction).
    """

    id: str
    image: np.ndarray
    label: np.ndarray | None = None
    source: str = ""


class Dataset(Plugin):
    """A finite, ordered, deterministic collection of images."""

    def __init__(self, params: Params | None = None, base_dir: Path | None = None) -> None:
        super().__init__(params)
        self.base_dir = Path(base_dir) if base_dir is not None else Path.cwd()

    @abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abstractmethod
    def __iter__(self) -> Iterator[ImageItem]:
        """The images in a fixed order, read lazily."""

    def slice(self, start: int, stop: int) -> Iterator[ImageItem]:
        """Images ``start`` to ``stop - 1`` of :meth:`__iter__`'s order, read lazily.

        A run reads its images through this, one block at a time (a process of a torchrun
        job reads only its own blocks). The default goes through :meth:`__iter__` from the
        start and skips; a dataset with random access should override it.
        """
        return itertools.islice(iter(self), start, stop)


# --------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class MetricInfo:
    """What a metric promises; aggregators and the contract tests rely on it.

    granularity: ``"map"`` returns a (C_a, C_b) matrix per layer pair; ``"layer"`` one value.
    higher_is_more_similar: False for distances (the best partner is then the minimum).
    value_range: inclusive bounds of the values (``float("inf")`` where unbounded).
    invariances: names such as ``"scale"``, ``"shift"``, ``"sign"``, ``"orthogonal"``.
    """

    granularity: Literal["map", "layer"] = "map"
    higher_is_more_similar: bool = True
    symmetric: bool = True
    value_range: tuple[float, float] = (0.0, 1.0)
    invariances: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Undefined:
    """A layer-granularity value that does not exist, and why (never a bare NaN).

    A layer metric returns ``Undefined("zero variance: ...")`` instead of a number when its
    value is undefined for the inputs (e.g. a layer whose maps are all constant, or too few
    samples for an unbiased estimator). ``layer_similarity.csv`` then gets ``value`` NaN and
    the text in its ``reason`` column.
    """

    reason: str


class Metric(Plugin):
    """A similarity (or distance) between maps.

    There are three ways to compute a metric; a metric implements one or more of them:

    * **moments** (``uses_moments = True``): :meth:`from_moments` reads the means and centred
      co-moments that the engine computes once per image and comparison group (one matrix
      product shared by every moment-based metric). A metric that also needs the per-pixel
      squared norms of each layer (see :class:`mapsim.engine.moments.Moments`) sets
      ``needs_layer_norms = True``.
    * **generic** (``uses_moments = False``): :meth:`from_maps` receives the maps themselves.
      Moment-based metrics should implement it too: the contract tests
      (:mod:`mapsim.testing`) check both paths against each other.
    * **across images** (``accumulates = True``): values that need all images at once (e.g.
      CKA with images as samples). The runner calls :meth:`update` once per image with that
      image's maps and :meth:`finish` once per comparison after the last image; keep only
      bounded state (e.g. one minibatch) between calls. Such metrics must have layer
      granularity; their rows go to ``layer_similarity.csv`` with the image ``all-images``.

    Map-granularity values that are undefined (dead maps) are NaN; the engine flags them and
    applies the spec's dead-map policy. Layer-granularity values that are undefined are
    returned as :class:`Undefined` with a reason.
    """

    info: ClassVar[MetricInfo] = MetricInfo()
    uses_moments: ClassVar[bool] = True
    #: True when :meth:`from_moments` reads ``moments.layer_norms`` (layer granularity only)
    needs_layer_norms: ClassVar[bool] = False
    #: True for a metric computed across images through :meth:`update` and :meth:`finish`
    accumulates: ClassVar[bool] = False
    #: True for an across-image metric whose images can be taken in block by block, in other
    #: processes or an earlier run (:meth:`start_blocks`, :meth:`block_state`,
    #: :meth:`add_block_state`); without it, a run with the metric cannot resume or use
    #: several processes
    blockwise: ClassVar[bool] = False
    #: values the original library used for (both dead, one dead); None: no such rule.
    dead_fill: ClassVar[tuple[float, float] | None] = None
    #: parameter sets the contract tests exercise (``tests/test_metric_contract.py`` runs
    #: :class:`mapsim.testing.MetricContract` over each set of every registered metric)
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        #: the name used in tables; a spec's ``label`` overrides it
        self.label = self.name

    def dead(self, moments: Moments, dead_std: float) -> torch.Tensor:
        """Boolean flag per map: True where the metric is undefined for that map."""
        return moments.variance() <= dead_std**2

    def from_moments(self, moments: Moments, rows: slice, cols: slice) -> torch.Tensor:
        """Values between maps ``rows`` and ``cols`` of the stacked maps, from their moments."""
        raise MetricPathError(f"metric {self.name!r} has no moments path (uses_moments=False)")

    def layers_from_moments(self, moments: Moments, rows: Sequence[slice],
                            cols: Sequence[slice]) -> list[list[Any]]:
        """Layer granularity: the values of every layer pair (``rows[i]``, ``cols[j]``) at once.

        Returns a ``len(rows)`` x ``len(cols)`` nested list of floats (or :class:`Undefined`).
        The engine calls this instead of :meth:`from_moments` per layer pair; the default
        loops over :meth:`from_moments`. Override it to compute all pairs with a few tensor
        ops and one device -> host transfer (see ``cka``); the values must match
        :meth:`from_moments` (the contract tests compare both).
        """
        return [[self.from_moments(moments, r, c) for c in cols] for r in rows]

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Values between the rows of ``x`` (C_a, P) and of ``y`` (C_b, P): the generic path.

        Map granularity: a (C_a, C_b) float64 tensor. Layer granularity: one value (a float
        or 0-d tensor) or :class:`Undefined`.
        """
        raise MetricPathError(f"metric {self.name!r} has no generic path (from_maps)")

    def update(self, image_id: str, maps: Mapping[str, Mapping[str, torch.Tensor]],
               mask: torch.Tensor | None = None) -> None:
        """Across-image metrics: take in one image's maps ``{model: {layer: (C, H, W)}}``.

        ``mask`` is the image's ROI mask (H, W) when the spec sets ``engine.roi``. Called once
        per image, in dataset order, for every model of the run.
        """
        raise MetricPathError(f"metric {self.name!r} does not accumulate over images")

    def finish(self, model_a: str, model_b: str) -> dict[tuple[str, str], Any]:
        """Across-image metrics: ``{(layer_a, layer_b): value or Undefined}`` after all images.

        Called once per comparison after the last :meth:`update`; may be called several times.
        """
        raise MetricPathError(f"metric {self.name!r} does not accumulate over images")

    def start_blocks(self) -> None:
        """Blockwise metrics: from now on :meth:`update` only collects what the next
        :meth:`block_state` hands over; the values come from :meth:`add_block_state` and
        :meth:`finish`. A run calls this before its first image."""
        raise MetricPathError(f"metric {self.name!r} cannot take its images in blocks")

    def block_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Blockwise metrics: what :meth:`update` collected since the last call, as JSON-able
        metadata and named numpy arrays (saved with the block; never pickled); the metric then
        holds none of it. Keep it small: it is stored for every block of images."""
        raise MetricPathError(f"metric {self.name!r} cannot take its images in blocks")

    def add_block_state(self, meta: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Blockwise metrics: take in one block's :meth:`block_state` (from this process or
        another), as if :meth:`update` had been called with that block's images here. Blocks
        arrive in image order; the result must not depend on where the blocks were cut."""
        raise MetricPathError(f"metric {self.name!r} cannot take its images in blocks")

    def describe(self) -> dict[str, Any]:
        """Name, parameters and metadata, as recorded in run.json."""
        info = self.info
        return {
            "name": self.name,
            "params": self.params.model_dump(mode="json"),
            "granularity": info.granularity,
            "higher_is_more_similar": info.higher_is_more_similar,
            "symmetric": info.symmetric,
            "value_range": list(info.value_range),
            "invariances": list(info.invariances),
        }


# --------------------------------------------------------------------------- aggregators
class Aggregator(Plugin):
    """Turns one similarity matrix into rows of named tables.

    Aggregators run in a fixed order (``order``), so that e.g. ``threshold`` can annotate the
    ``max`` table before ``pivot`` reads it. ``requires`` names aggregators that must run too
    (the runner adds them with default parameters). ``summarise`` maps a table name to its key
    columns; the numeric columns of such tables get a mean and std across images.
    """

    order: ClassVar[int] = 100
    requires: ClassVar[tuple[str, ...]] = ()
    summarise: ClassVar[dict[str, tuple[str, ...]]] = {}

    def prepare(self, metrics: Sequence[Metric]) -> None:
        """Check the run's metrics before the first image (raise a SpecError to refuse one)."""

    @abstractmethod
    def aggregate(
        self, sim: SimilarityMatrix, tables: dict[str, pd.DataFrame]
    ) -> dict[str, pd.DataFrame]:
        """Return the tables this aggregator adds or updates for one similarity matrix.

        ``tables`` holds what earlier aggregators produced for the same matrix (read-only:
        copy a table before changing it).
        """
