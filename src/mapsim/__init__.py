"""mapsim: extract, compare and summarise the activation maps of convolutional networks.

The public API. Notebooks and scripts use :func:`load_spec`, :func:`run`, :func:`open_results`
and :class:`Results`; plugin authors subclass the base classes below and import nothing else
from mapsim. The run-level names are imported on first use, so ``import mapsim`` stays cheap
(a plugin module imports it while the registry is being built).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from mapsim.observers import RunObserver
from mapsim.errors import (
    ExtractionError,
    ImageError,
    LayerNotFoundError,
    MapsimError,
    ModelError,
    ShapeMismatchError,
    SpecError,
    closest_matches,
)
from mapsim.hookspecs import hookimpl
from mapsim.types import Block, LayerValue, Moments, SimilarityMatrix

if TYPE_CHECKING:  # pragma: no cover
    from mapsim.results import Results, open_results
    from mapsim.session import load_spec, run

__version__ = "0.1.0"

#: name -> module of the names imported on first use
_LAZY = {
    "run": "mapsim.session",
    "load_spec": "mapsim.session",
    "open_results": "mapsim.results",
    "Results": "mapsim.results",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mapsim' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Aggregator",
    "Architecture",
    "Block",
    "closest_matches",
    "Dataset",
    "ExtractionError",
    "Extractor",
    "FusesForInference",
    "hookimpl",
    "ImageError",
    "ImageItem",
    "ImagesMetric",
    "LayerMetric",
    "LayerNotFoundError",
    "LayerValue",
    "load_spec",
    "MapMetric",
    "MapsimError",
    "Metric",
    "MetricInfo",
    "MetricPathError",
    "ModelError",
    "Moments",
    "open_results",
    "Params",
    "Results",
    "run",
    "RunObserver",
    "ShapeMismatchError",
    "SimilarityMatrix",
    "SpecError",
    "Undefined",
    "__version__",
]
