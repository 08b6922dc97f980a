"""mapsim: extract, compare and summarise the activation maps of convolutional networks.

The public API. Notebooks and scripts use :func:`load_spec`, :func:`run`, :func:`open_results`
and :class:`Results`; plugin authors subclass the base classes (:class:`MapMetric`, ...) and
import nothing else from mapsim. Every name but the errors and the version is imported on first
use, so ``import mapsim`` loads neither torch nor pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mapsim._version import __version__
from mapsim.errors import (
    DuplicatePluginError,
    ExtractionError,
    ImageError,
    LayerNotFoundError,
    LayerNotRunError,
    LayerOutputError,
    MapsimError,
    ModelError,
    OutputError,
    PluginLoadError,
    ShapeMismatchError,
    SpecError,
    UnknownNameError,
    WeightsError,
    closest_matches,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from mapsim.api import (
        Aggregator,
        Architecture,
        Dataset,
        Extractor,
        FusesForInference,
        ImageItem,
        ImagesMetric,
        LayerMetric,
        MapMetric,
        Metric,
        MetricInfo,
        MetricPathError,
        Params,
        Undefined,
    )
    from mapsim.hookspecs import hookimpl
    from mapsim.io.images import expand_paths, read_image, read_label, to_channels
    from mapsim.io.images import normalise as normalise_image
    from mapsim.io.pairing import FileEntry, find_image_files, image_ids
    from mapsim.io.splits import split_indices
    from mapsim.models.selectors import LayerPath, describe_output, parse_layer, select_output
    from mapsim.observers import RunObserver
    from mapsim.prune_api import PruneChoice, PruneCriterion, PruneLayer
    from mapsim.results import Results, open_results
    from mapsim.session import load_spec, run
    from mapsim.tables.aggregation import PIVOT_KEYS
    from mapsim.types import Block, LayerValue, Moments, PValued, SimilarityMatrix

#: public name -> (module, attribute): imported on first use, so that ``import mapsim`` (and
#: ``mapsim --version``) loads neither torch nor pandas until a name that needs them is used
_LAZY = {
    **{name: ("mapsim.api", name) for name in (
        "Aggregator", "Architecture", "Dataset", "Extractor", "FusesForInference", "ImageItem",
        "ImagesMetric", "LayerMetric", "MapMetric", "Metric", "MetricInfo", "MetricPathError",
        "Params", "Undefined")},
    **{name: ("mapsim.types", name) for name in (
        "Block", "LayerValue", "Moments", "PValued", "SimilarityMatrix")},
    "hookimpl": ("mapsim.hookspecs", "hookimpl"),
    **{name: ("mapsim.prune_api", name) for name in ("PruneChoice", "PruneCriterion", "PruneLayer")},
    "RunObserver": ("mapsim.observers", "RunObserver"),
    # for plugin authors: image files, labels and splits (numpy only)
    **{name: ("mapsim.io.images", name) for name in (
        "expand_paths", "read_image", "read_label", "to_channels")},
    "normalise_image": ("mapsim.io.images", "normalise"),
    **{name: ("mapsim.io.pairing", name) for name in (
        "FileEntry", "find_image_files", "image_ids")},
    "split_indices": ("mapsim.io.splits", "split_indices"),
    # for extractor authors: layer paths with output selectors (block[0], head['logits'], m#2)
    **{name: ("mapsim.models.selectors", name) for name in (
        "LayerPath", "describe_output", "parse_layer", "select_output")},
    "run": ("mapsim.session", "run"),
    "load_spec": ("mapsim.session", "load_spec"),
    "open_results": ("mapsim.results", "open_results"),
    "Results": ("mapsim.results", "Results"),
    "PIVOT_KEYS": ("mapsim.tables.aggregation", "PIVOT_KEYS"),
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'mapsim' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where[0]), where[1])
    globals()[name] = value
    return value


def best_partners(sim: SimilarityMatrix, best: bool = True) -> pd.DataFrame:
    """The ``max.csv`` table of ``sim`` (``best=False``: ``min.csv``).

    One row per map of model A and layer of model B: the map's best partner in that layer
    (the highest value for a similarity, the lowest for a distance; ``best=False``: the worst)
    and the value. Within one model and the same layer a map is never its own partner; a map
    with no eligible partner (it is dead, or every map of the layer is) gets an empty partner
    and value, and its ``dead_a`` flag says why. Columns: ``metric, model_a, layer_a, map_a,
    model_b, layer_b, map_b, value, dead_a, dead_b``. The table helpers import pandas on first
    use.
    """
    from mapsim.tables.aggregation import partners

    return partners(sim, best=best)


def passes_threshold(
    values: pd.Series, threshold: float, higher_is_more_similar: bool
) -> pd.Series:
    """Which best values pass ``threshold``: ``>=`` for a similarity, ``<=`` for a distance
    (``higher_is_more_similar=False``); a missing value (dead map) never passes."""
    from mapsim.tables.aggregation import passes

    return passes(values, threshold, higher_is_more_similar)


def pivot_table(
    best: pd.DataFrame, threshold: float, higher_is_more_similar: bool
) -> pd.DataFrame:
    """The ``pivot.csv`` table (the study's Table 3) of a :func:`best_partners` table.

    One row per (metric, model a, layer a, model b, layer b) (:data:`PIVOT_KEYS`): n_maps,
    n_dead, n_live, mean / median / std of the best values of the live maps (``best_*``), and
    the count, % of n_maps, mean, median and std of those that pass ``threshold``
    (``n_well``, ``pct_well``, ``well_*``; :func:`passes_threshold`).
    """
    from mapsim.tables.aggregation import pivot

    return pivot(best, threshold, higher_is_more_similar)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Aggregator",
    "Architecture",
    "best_partners",
    "Block",
    "closest_matches",
    "describe_output",
    "Dataset",
    "DuplicatePluginError",
    "expand_paths",
    "FileEntry",
    "find_image_files",
    "ExtractionError",
    "Extractor",
    "FusesForInference",
    "hookimpl",
    "image_ids",
    "ImageError",
    "ImageItem",
    "ImagesMetric",
    "LayerMetric",
    "LayerNotFoundError",
    "LayerNotRunError",
    "LayerOutputError",
    "LayerPath",
    "LayerValue",
    "load_spec",
    "MapMetric",
    "MapsimError",
    "Metric",
    "MetricInfo",
    "MetricPathError",
    "ModelError",
    "Moments",
    "normalise_image",
    "OutputError",
    "PValued",
    "parse_layer",
    "passes_threshold",
    "PIVOT_KEYS",
    "pivot_table",
    "PluginLoadError",
    "PruneChoice",
    "PruneCriterion",
    "PruneLayer",
    "open_results",
    "Params",
    "read_image",
    "read_label",
    "Results",
    "run",
    "RunObserver",
    "select_output",
    "ShapeMismatchError",
    "SimilarityMatrix",
    "SpecError",
    "split_indices",
    "to_channels",
    "Undefined",
    "UnknownNameError",
    "WeightsError",
    "__version__",
]
