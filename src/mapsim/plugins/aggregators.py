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

    def __init__(self, params: ThresholdParams | None = None) -> None:
        super().__init__(params)
        #: metric label -> its threshold, resolved by :meth:`prepare`
        self._thresholds: dict[str, float] = {}

    def prepare(self, metrics: list[Metric]) -> None:
        """Refuse a distance metric without a threshold of its own in ``per_metric``, and a
        ``per_metric`` label that names no metric of the run (a typo would be ignored).

        Each map metric's threshold: its ``per_metric`` entry; else the ``default_threshold``
        its :class:`mapsim.MetricInfo` declares; else ``value`` (default 0.8, the study's
        threshold for |r|) when it is a similarity with values in [-1, 1]. A distance, or a
        similarity on another scale, without either is refused: 0.8 would mean nothing there.
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
        self._thresholds = {}
        for metric in metrics:
            if metric.info.granularity != "map":
                continue
            self._thresholds[metric.label] = self._threshold_of(metric)

    def _threshold_of(self, metric: Metric) -> float:
        """``per_metric`` first, then the metric's declared ``default_threshold``, then
        ``value`` for a similarity whose values lie in [-1, 1]; anything else is refused."""
        info = metric.info
        if metric.label in self.params.per_metric:
            return self.params.per_metric[metric.label]
        if info.default_threshold is not None:
            return info.default_threshold
        if not info.higher_is_more_similar:
            raise SpecError(
                f"threshold: metric {metric.label!r} is a distance (lower is more similar), "
                f"so the similarity threshold value {self.params.value:g} does not apply to "
                f"it; give it its own maximum distance, e.g. {{name: threshold, "
                f"per_metric: {{{metric.label}: 1.5}}}}"
            )
        low, high = info.value_range
        if low < -1 or high > 1:
            raise SpecError(
                f"threshold: metric {metric.label!r} takes values in [{low:g}, {high:g}], so "
                f"the threshold value {self.params.value:g} (meant for correlations in [-1, "
                f"1]) says nothing about it; give it its own, e.g. {{name: threshold, "
                f"per_metric: {{{metric.label}: ...}}}}, or declare a default_threshold in "
                "its MetricInfo"
            )
        return self.params.value

    def aggregate(self, sim: SimilarityMatrix, tables: Tables) -> Tables:
        threshold = self._thresholds.get(sim.metric, self.params.per_metric.get(
            sim.metric, self.params.value))
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
