"""The hooks a mapsim plugin implements.

Each hook receives ``register``, a callable owned by mapsim: call it once per class the plugin
provides. mapsim records which distribution provided each class, refuses duplicate names and
builds the spec schema from the classes' ``Params`` models.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "mapsim"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[type], None]


@hookspec
def register_metrics(register: Register) -> None:
    """Register similarity metrics.

    :param register: call ``register(MetricClass)`` for each :class:`mapsim.Metric` subclass.
    """


@hookspec
def register_aggregators(register: Register) -> None:
    """Register aggregators (``max``, ``threshold``, ``pivot``, ...).

    :param register: call ``register(AggregatorClass)`` for each :class:`mapsim.Aggregator`.
    """


@hookspec
def register_architectures(register: Register) -> None:
    """Register network architectures usable as ``architecture: {name: ...}`` in a spec.

    :param register: call ``register(ArchitectureClass)`` for each :class:`mapsim.Architecture`.
    """


@hookspec
def register_extractors(register: Register) -> None:
    """Register activation extractors (the default is ``hooks``).

    :param register: call ``register(ExtractorClass)`` for each :class:`mapsim.Extractor`.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register image sources usable as ``images: {name: ...}`` in a spec.

    :param register: call ``register(DatasetClass)`` for each :class:`mapsim.Dataset`.
    """


@hookspec
def register_prune_criteria(register: Register) -> None:
    """Register pruning criteria usable as ``criteria: [{name: ...}]`` in a prune spec.

    :param register: call ``register(CriterionClass)`` for each :class:`mapsim.PruneCriterion`.
    """
