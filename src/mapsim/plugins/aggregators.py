"""Built-in aggregators: ``max``, ``min``, ``threshold`` and ``pivot`` (the study's tables)."""

from __future__ import annotations

import pandas as pd
from pydantic import Field

from mapsim import (
    PIVOT_KEYS,
    Aggregator,
    Metric,
    Params,
    SimilarityMatrix,
    SpecError,
    best_partners,
    closest_matches,
    hookimpl,
    passes_threshold,
    pivot_table,
)

Tables = dict[str, pd.DataFrame]


class MaxAggregator(Aggregator):
    """``max.csv``: each map's best partner in every layer (highest similarity, lowest distance)."""

    name = "max"
    order = 10

    def aggregate(self, sim: SimilarityMatrix, tables: Tables) -> Tables:
        return {"max": best_partners(sim, best=True)}


class MinAggregator(Aggregator):
    """``min.csv``: each map's least similar partner in every layer."""

    name = "min"
    order = 20

    def aggregate(self, sim: SimilarityMatrix, tables: Tables) -> Tables:
        return {"min": best_partners(sim, best=False)}


class ThresholdParams(Params):
    """Parameters of ``threshold``."""

    value: float = 0.8
    """A map is well correlated when its best value is >= this (similarity metrics)."""
    per_metric: dict[str, float] = Field(default_factory=dict)
    """Thresholds for particular metrics (by metric label), overriding ``value``. A distance
    metric (e.g. euclidean) must have one: a map passes when its best distance is <= it."""


class ThresholdAggregator(Aggregator):
    """Adds ``threshold`` and ``well_correlated`` columns to ``max.csv``."""

    name = "threshold"
    Params = ThresholdParams
    order = 30
    requires = ("max",)

    def prepare(self, metrics: list[Metric]) -> None:
        """Refuse a distance metric without a threshold of its own in ``per_metric``, and a
        ``per_metric`` label that names no metric of the run (a typo would be ignored).

        ``value`` (default 0.8) is a similarity threshold; a distance
        (``higher_is_more_similar = False``) has no meaningful default, so it needs an entry
        ``per_metric: {label: maximum distance}``.
        """
        labels = [m.label for m in metrics]
        for label in self.params.per_metric:
            if label not in labels:
                matches = closest_matches(label, labels)
                near = f" Closest: {', '.join(matches)}." if matches else ""
                raise SpecError(
                    f"threshold.per_metric: {label!r} is not a metric label of this run "
                    f"({', '.join(labels)}).{near}"
                )
        for metric in metrics:
            if (metric.info.granularity == "map" and not metric.info.higher_is_more_similar
                    and metric.label not in self.params.per_metric):
                raise SpecError(
                    f"threshold: metric {metric.label!r} is a distance (lower is more similar), "
                    f"so the similarity threshold value {self.params.value:g} does not apply to "
                    f"it; give it its own maximum distance, e.g. {{name: threshold, "
                    f"per_metric: {{{metric.label}: 1.5}}}}"
                )

    def aggregate(self, sim: SimilarityMatrix, tables: Tables) -> Tables:
        threshold = self.params.per_metric.get(sim.metric, self.params.value)
        best = tables["max"].copy(deep=False)  # only adds columns
        best["threshold"] = threshold
        best["well_correlated"] = passes_threshold(
            best["value"], threshold, sim.higher_is_more_similar
        )
        return {"max": best}


class PivotAggregator(Aggregator):
    """``pivot.csv``: the study's per-layer-pair statistics (Table 3); summarised across images."""

    name = "pivot"
    order = 40
    requires = ("max", "threshold")
    summarise = {"pivot": (*PIVOT_KEYS, "threshold")}

    def aggregate(self, sim: SimilarityMatrix, tables: Tables) -> Tables:
        best = tables["max"]
        threshold = float(best["threshold"].iloc[0])
        return {"pivot": pivot_table(best, threshold, sim.higher_is_more_similar)}


@hookimpl
def register_aggregators(register) -> None:
    """Register the built-in aggregators."""
    for cls in (MaxAggregator, MinAggregator, ThresholdAggregator, PivotAggregator):
        register(cls)
