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
    ImageItem,
    Metric,
    MetricInfo,
    Params,
    Undefined,
)
from mapsim.hookspecs import hookimpl

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
    "Dataset",
    "Extractor",
    "ImageItem",
    "Metric",
    "MetricInfo",
    "Params",
    "Results",
    "Undefined",
    "__version__",
    "hookimpl",
    "load_spec",
    "open_results",
    "run",
]
