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
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict

from mapsim.errors import MapsimError

from mapsim.types import Moments, SimilarityMatrix

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    from torch import nn


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

    @classmethod
    def create(cls, params: Params, **kwargs: Any) -> Plugin:
        """The plugin for validated ``params``: ``cls(params)``. A registered name that
        stands for a family of classes (``cka``: per image or across images) overrides this
        to pick the class by its parameters."""
        return cls(params, **kwargs)


# --------------------------------------------------------------------------- architectures
class Architecture(Plugin):
    """Builds an ``nn.Module`` from its parameters (weights are loaded by the core)."""

    @abstractmethod
    def build(self) -> nn.Module:
        """A new model with freshly initialised weights."""

    def in_channels(self) -> int:
        """Number of input channels the built model expects."""
        return 1


@runtime_checkable
class FusesForInference(Protocol):
    """Optional: a model built by an architecture may fold layers for inference.

    When a model has this method and the spec keeps ``engine.fuse_batchnorm`` on, the runner
    calls ``fuse_for_inference(captured)`` once, after loading the weights, with the module
    paths it captures; the model folds what it can without changing what those paths show
    (``fcn`` folds batch norms into convolutions) and returns the paths of the modules it
    folded (recorded in run.json).
    """

    def fuse_for_inference(self, captured: Collection[str]) -> list[str]: ...


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

    def stream(self, model: nn.Module, layers: Sequence[str], inputs: torch.Tensor,
               on_output: Callable[[str, torch.Tensor], None]) -> bool:
        """Optional fast path: call ``on_output(path, output)`` while each requested layer's
        output exists (valid only during the call), so that the engine builds the moments
        without keeping the maps. Return False, calling nothing, when this model cannot be
        streamed; the runner then uses :meth:`extract`. The default cannot stream."""
        return False

    @classmethod
    def can_stream(cls) -> bool:
        """Whether this extractor implements :meth:`stream`."""
        return cls.stream is not Extractor.stream


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
    default_threshold: when a best value counts as well correlated, for this metric, unless
    the spec's ``threshold`` aggregator says otherwise (see :attr:`default_threshold`).
    """

    granularity: Literal["map", "layer"] = "map"
    higher_is_more_similar: bool = True
    symmetric: bool = True
    value_range: tuple[float, float] = (0.0, 1.0)
    invariances: tuple[str, ...] = field(default_factory=tuple)
    #: the ``threshold`` aggregator's default for this metric (None: the aggregator's
    #: ``value`` where the values lie in [-1, 1], else the spec must give one in ``per_metric``)
    default_threshold: float | None = None


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
    """What every similarity (or distance) metric has: a name, parameters, metadata, a label.

    A plugin subclasses one of the three kinds, by what the metric is:

    * :class:`MapMetric`: compares every map of one layer with every map of another, one
      (C_a, C_b) matrix per layer pair and image (Pearson, cosine, Euclidean);
    * :class:`LayerMetric`: one value per layer pair and image (CKA with pixels as samples);
    * :class:`ImagesMetric`: one value per layer pair over all images of a run (CKA with images
      as samples); it declares its state, so blocks, ``--resume`` and torchrun work for it.

    Subclassing :class:`Metric` itself with the flags ``uses_moments``, ``accumulates`` and
    ``blockwise`` is the API of mapsim 0.1; it still works, with a ``DeprecationWarning``, and
    goes away in 0.3. The engine reads the flags below from every metric; the three kinds set
    them for you.
    """

    info: ClassVar[MetricInfo] = MetricInfo()
    #: parameter sets the contract tests exercise (``tests/test_metric_contract.py`` runs
    #: :class:`mapsim.testing.MetricContract` over each set of every registered metric)
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    #: values the original library used for (both dead, one dead); None: no such rule.
    dead_fill: ClassVar[tuple[float, float] | None] = None
    # Engine-facing flags (0.1 API; the three kinds derive them):
    #: True when the values come from :meth:`from_moments` (the shared product)
    uses_moments: bool = True
    #: True when :meth:`from_moments` reads ``moments.layer_norms`` (layer granularity only)
    needs_layer_norms: bool = False
    #: True for a metric computed across images through :meth:`update` and :meth:`finish`
    accumulates: bool = False
    #: True when such a metric can take its images in blocks (:meth:`start_blocks`,
    #: :meth:`block_state`, :meth:`add_block_state`)
    blockwise: bool = False

    #: the granularity a kind gives its metrics (set by the kinds below; None: as declared)
    kind_granularity: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind_granularity is not None and cls.info.granularity != cls.kind_granularity:
            cls.info = replace(cls.info, granularity=cls.kind_granularity)
        if cls.__module__ != __name__ and not issubclass(cls, _KINDS):
            warnings.warn(
                f"metric class {cls.__qualname__} subclasses mapsim.Metric directly (the 0.1 "
                "API, removed in 0.3): subclass mapsim.MapMetric, mapsim.LayerMetric or "
                "mapsim.ImagesMetric instead (see docs/plugins.md)",
                DeprecationWarning, stacklevel=2,
            )

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        #: the name used in tables; a spec's ``label`` overrides it
        self.label = self.name

    def dead(self, moments: Moments, dead_std: float) -> torch.Tensor:
        """Boolean flag per map: True where the metric is undefined for that map."""
        return moments.variance() <= dead_std**2

    def from_moments(self, moments: Moments, rows: slice, cols: slice) -> Any:
        """Values between maps ``rows`` and ``cols`` of the stacked maps, from their moments."""
        raise MetricPathError(f"metric {self.name!r} has no moments path (uses_moments=False)")

    def layers_from_moments(self, moments: Moments, rows: Sequence[slice],
                            cols: Sequence[slice]) -> list[list[Any]]:
        """Layer granularity: the values of every layer pair (``rows[i]``, ``cols[j]``) at once.

        Returns a ``len(rows)`` x ``len(cols)`` nested list of floats (or :class:`Undefined`).
        The default loops over :meth:`from_moments`; override it to compute all pairs with a
        few tensor ops and one device -> host transfer (see ``cka``); the values must match
        :meth:`from_moments` (the contract tests compare both).
        """
        return [[self.from_moments(moments, r, c) for c in cols] for r in rows]

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        """Values between the rows of ``x`` (C_a, P) and of ``y`` (C_b, P): the generic path.

        Map granularity: a (C_a, C_b) float64 tensor. Layer granularity: one value (a float
        or 0-d tensor) or :class:`Undefined`.
        """
        raise MetricPathError(f"metric {self.name!r} has no generic path (from_maps)")

    def update(self, image_id: str, maps: Mapping[str, Mapping[str, torch.Tensor]],
               mask: torch.Tensor | None = None) -> None:
        """Across-image metrics: take in one image's maps ``{model: {layer: (C, H, W)}}``."""
        raise MetricPathError(f"metric {self.name!r} does not accumulate over images")

    def finish(self, model_a: str, model_b: str) -> dict[tuple[str, str], Any]:
        """Across-image metrics: ``{(layer_a, layer_b): value or Undefined}`` after all images."""
        raise MetricPathError(f"metric {self.name!r} does not accumulate over images")

    def start_blocks(self) -> None:
        """Blockwise metrics: from now on :meth:`update` only collects what the next
        :meth:`block_state` hands over. A run calls this before its first image."""
        raise MetricPathError(f"metric {self.name!r} cannot take its images in blocks")

    def start_block(self, start: int, n_images: int) -> None:
        """Called by a run before each block: the next images given to :meth:`update` are
        images ``start``, ``start + 1``, ... of the run's ``n_images``. Nothing by default;
        a metric that groups images by their place (``cka``'s minibatches) uses it."""

    def block_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Blockwise metrics: what :meth:`update` collected since the last call, as JSON-able
        metadata and named numpy arrays (saved with the block; never pickled)."""
        raise MetricPathError(f"metric {self.name!r} cannot take its images in blocks")

    def add_block_state(self, meta: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Blockwise metrics: take in one block's :meth:`block_state`, blocks in image order."""
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


def _overrides(metric: Metric, base: type, method: str) -> bool:
    return getattr(type(metric), method) is not getattr(base, method)


def _choose_path(metric: Metric, kind: type) -> None:
    """A map or layer metric reads the moments when it implements ``from_moments``, else its
    maps; one with neither is a plugin bug, refused when it is built."""
    metric.uses_moments = _overrides(metric, kind, "from_moments")
    if not metric.uses_moments and not _overrides(metric, kind, "from_maps"):
        raise TypeError(f"{type(metric).__name__} implements neither from_moments nor "
                        f"from_maps; a {kind.__name__} needs at least one")


class MapMetric(Metric):
    """A metric between single maps: a (C_a, C_b) matrix for every layer pair and image.

    Implement :meth:`from_moments` (read off the means and centred co-moments that one matrix
    product per image gives every such metric) and/or :meth:`from_maps` (the maps themselves,
    rows of x (C_a, P) and y (C_b, P)); both return a float64 tensor of shape (C_a, C_b).
    With both, the engine uses the moments and the contract tests check that the two agree.
    Values that are undefined because a map is dead are NaN; the engine flags them
    (:meth:`dead`) and applies the spec's dead-map policy (``dead_fill`` gives the original
    library's values for pairs with a dead map). The tables' best partner, threshold and pivot
    follow ``info.higher_is_more_similar``.
    """

    kind_granularity = "map"

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        _choose_path(self, MapMetric)

    def from_moments(self, moments: Moments, rows: slice, cols: slice) -> torch.Tensor:
        """(C_a, C_b) values between maps ``rows`` and ``cols`` of the stacked maps."""
        return super().from_moments(moments, rows, cols)

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(C_a, C_b) float64 values between the rows of ``x`` and the rows of ``y``."""
        return super().from_maps(x, y)


class LayerMetric(Metric):
    """A metric between whole layers: one value per layer pair and image (e.g. CKA).

    Implement :meth:`from_moments` (optionally :meth:`layers_from_moments`, every layer pair
    at once) and/or :meth:`from_maps`. A value is a float, or :class:`Undefined` with a reason
    (never a bare NaN). Set ``needs_layer_norms = True`` in ``__init__`` when
    :meth:`from_moments` reads ``moments.layer_norms``. Rows go to ``layer_similarity.csv``.
    """

    kind_granularity = "layer"

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        _choose_path(self, LayerMetric)

    def from_moments(self, moments: Moments, rows: slice, cols: slice) -> float | Undefined:
        """The value between the layers at rows ``rows`` and ``cols`` of the stacked maps."""
        return super().from_moments(moments, rows, cols)

    def from_maps(self, x: torch.Tensor, y: torch.Tensor) -> float | Undefined:
        """The value between layer x (C_a, P) and layer y (C_b, P)."""
        return super().from_maps(x, y)


#: how a declared state of an :class:`ImagesMetric` merges
StateReduce = Literal["cat", "sum"]


class ImagesMetric(Metric):
    """A metric over all images of a run: one value per layer pair (rows with the image
    ``all-images`` in ``layer_similarity.csv``), e.g. CKA with images as samples.

    Declare the state in ``__init__`` with :meth:`add_state`, then implement :meth:`update`
    (called once per image, in dataset order, with ``{model: {layer: (C, H, W)}}``) and
    :meth:`compute` (the values after the last image). A run takes its images in blocks, in
    one or several processes, and may resume: each block's state is saved (as numpy arrays,
    never pickled) and the states are merged in image order with :meth:`merge` before
    :meth:`compute`, so any metric that keeps all it needs in declared state gets blocks,
    ``--resume`` and torchrun for free. Keep states small: a ``cat`` state holds one entry per
    image of a block.

    * ``reduce="cat"``: the attribute is a list; :meth:`update` appends one entry per image, a
      numpy array / tensor or a dict of them (the entries of one block must share shapes);
      merging concatenates in image order.
    * ``reduce="sum"``: the attribute is a float64 numpy array; merging adds.

    Override :meth:`merge` to fold entries into a bounded summary as they arrive (``cka`` forms
    its minibatches there); call ``super().merge`` for the states you do not fold.
    """

    accumulates = True
    blockwise = True
    uses_moments = False

    kind_granularity = "layer"

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self._states: dict[str, tuple[StateReduce, Any]] = {}

    def add_state(self, name: str, reduce: StateReduce = "cat", default: Any = 0.0) -> None:
        """Declare the attribute ``name`` as state (``default``: the start of a sum state)."""
        if reduce not in ("cat", "sum"):
            raise ValueError(f"state {name!r}: reduce must be 'cat' or 'sum', not {reduce!r}")
        self._states[name] = (reduce, default)
        self._reset_state(name)

    def _reset_state(self, name: str) -> None:
        reduce, default = self._states[name]
        setattr(self, name, [] if reduce == "cat" else np.array(default, dtype=np.float64))

    @abstractmethod
    def update(self, image_id: str, maps: Mapping[str, Mapping[str, torch.Tensor]],
               mask: torch.Tensor | None = None) -> None:
        """Take in one image's maps ``{model: {layer: (C, H, W)}}`` (``mask``: its ROI mask
        (H, W) when the spec sets ``engine.roi``), by updating the declared states."""

    @abstractmethod
    def compute(self, model_a: str, model_b: str) -> dict[tuple[str, str], Any]:
        """``{(layer_a, layer_b): value or Undefined}`` from the states, after all images."""

    def merge(self, states: Mapping[str, Any]) -> None:
        """Take in another part's states (``{name: value}``, parts in image order)."""
        for name, value in states.items():
            reduce, _ = self._states[name]
            if reduce == "cat":
                getattr(self, name).extend(value)
            else:
                setattr(self, name, getattr(self, name) + np.asarray(value, dtype=np.float64))

    # The engine's side of the contract (Metric's 0.1 names), in terms of the states.
    def finish(self, model_a: str, model_b: str) -> dict[tuple[str, str], Any]:
        return self.compute(model_a, model_b)

    def start_blocks(self) -> None:
        """Nothing to do: states are taken out block by block by :meth:`block_state`."""

    def block_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The declared states since the last call, as metadata and named arrays; the
        states then start afresh."""
        meta: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for name, (reduce, _) in self._states.items():
            value = getattr(self, name)
            if reduce == "sum":
                arrays[name] = np.asarray(value, dtype=np.float64)
                meta[name] = {"reduce": "sum"}
            else:
                keys = list(value[0]) if value and isinstance(value[0], Mapping) else None
                meta[name] = {"reduce": "cat", "entries": len(value), "keys": keys}
                if keys is None and value:
                    arrays[name] = np.stack([_numpy(v) for v in value])
                for key in keys or ():
                    arrays[f"{name}/{key}"] = np.stack([_numpy(v[key]) for v in value])
            self._reset_state(name)
        return meta, arrays

    def add_block_state(self, meta: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Merge one block's :meth:`block_state` (blocks arrive in image order)."""
        states: dict[str, Any] = {}
        for name, about in meta.items():
            if about["reduce"] == "sum":
                states[name] = arrays[name]
            elif about["keys"] is None:
                states[name] = [arrays[name][i] for i in range(about["entries"])]
            else:
                states[name] = [{k: arrays[f"{name}/{k}"][i] for k in about["keys"]}
                                for i in range(about["entries"])]
        self.merge(states)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


_KINDS = (MapMetric, LayerMetric, ImagesMetric)


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
