"""mapsim: extract, compare and summarise the activation maps of convolutional networks."""

from mapsim.hookspecs import hookimpl
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

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "Architecture",
    "Dataset",
    "Extractor",
    "ImageItem",
    "Metric",
    "MetricInfo",
    "Params",
    "Undefined",
    "__version__",
    "hookimpl",
]
