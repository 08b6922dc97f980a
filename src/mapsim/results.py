"""The results of a run, for notebooks and scripts: tables as DataFrames, figures as objects.

>>> import mapsim
>>> res = mapsim.open_results("results/quickstart")        # doctest: +SKIP
>>> res.pivot.head()                                         # doctest: +SKIP
>>> fig = res.heatmap("pearson", "pct_well")                 # doctest: +SKIP
>>> fig.savefig("pct_well.png")                              # doctest: +SKIP

Reading needs pandas only; the figure methods import matplotlib (through
:mod:`mapsim.plots`) when first called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from mapsim.errors import MapsimError, UnknownNameError
from mapsim.io.results import POOLED_IMAGE, TABLES, MetricView, ResultsDir

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["Results", "open_results"]

#: the statistics :meth:`Results.heatmap` draws for a map-level metric
MAP_STATISTICS = ("best_mean", "pct_well")


class Results(ResultsDir):
    """A results directory written by :func:`mapsim.run` or ``mapsim run``.

    Open one with :func:`open_results` (:func:`mapsim.run` returns one). Every table is a
    :class:`pandas.DataFrame` read on first use and kept (change a ``.copy()``); a table the
    run did not write is an empty DataFrame. Key columns (image, metric, model and layer
    names, statistic) are text. The tables: :attr:`max`, :attr:`min`, :attr:`pivot`,
    :attr:`summary`, :attr:`layer_similarity`, :attr:`layer_similarity_summary`,
    :attr:`dead_maps`, the chance tables :attr:`baselines` and :attr:`map_pvalues`, and
    :meth:`pooled`; :attr:`info` is run.json.
    """

    @property
    def dir(self) -> Path:
        """The results directory."""
        return self.root

    @property
    def n_images(self) -> int:
        """The number of images the run compared (run.json ``n_images``)."""
        return int(self.info.get("n_images", 0))

    @property
    def tables(self) -> list[str]:
        """The tables present: top-level ones in the order of :data:`TABLES` (then any
        others, sorted), then the pooled ones as ``pooled/<name>``."""
        top = {p.stem for p in self.root.glob("*.csv")}
        names = [t for t in TABLES if t in top] + sorted(top - set(TABLES))
        return names + [f"pooled/{t}" for t in self.pooled_tables()]

    @property
    def baselines(self) -> pd.DataFrame:
        """baselines.csv: chance levels per layer pair, threshold, ``statistic``
        (``best_mean``, ``pct_well``) and ``baseline`` (``spatial-null``, ``untrained``):
        ``observed`` (the mean over images), the baseline's ``mean`` and ``p95`` over its ``n``
        draws, and ``above`` (observed > p95). Empty when the run wrote none
        (``statistics.spatial_null: false``). See the results contract, "Chance levels"."""
        return self.frame("baselines")

    @property
    def map_pvalues(self) -> pd.DataFrame:
        """map_pvalues.csv: per map of layer a and layer b, its most frequent best
        ``partner``, ``observed`` (mean best value), the paired sign-flip p-value ``p``
        against the spatial null, the Benjamini-Hochberg ``q`` (within the layer pair) and
        ``significant`` (q below ``statistics.fdr``). Empty when the run wrote none."""
        return self.frame("map_pvalues")

    def pooled_tables(self) -> list[str]:
        """The names of the pooled tables present (``pooled/<name>.csv``), sorted."""
        return sorted(p.stem for p in (self.root / "pooled").glob("*.csv"))

    def pooled(self, name: str) -> pd.DataFrame:
        """``pooled/<name>.csv``: a table computed once from moments merged over all images
        (``image`` is ``"pooled"``), e.g. ``res.pooled("pivot")``.

        Empty when the run wrote no pooled tables (``engine.pooled: false``) or that table
        is not among them although it is one a run writes (e.g. a metric without a moments
        path). A name that is no table raises :class:`~mapsim.errors.UnknownNameError`.
        """
        name = name.removeprefix("pooled/").removesuffix(".csv")
        present = self.pooled_tables()
        if name not in present and name not in TABLES:
            raise UnknownNameError("pooled table", name, present or TABLES)
        return self.frame(f"pooled/{name}")

    def __repr__(self) -> str:
        tables = ", ".join(self.tables) or "no tables"
        return (f"<Results {self.name!r}: {self.n_images} image(s), {tables}; "
                f"in {str(self.root)!r}>")

    # ------------------------------------------------------------------ figures
    def heatmap(self, metric: str = "pearson", statistic: str | None = None,
                model_a: str | None = None, model_b: str | None = None) -> Figure:
        """The layer x layer heat map of one metric and comparison direction.

        :param metric: a metric label of the run (``res.metrics()`` lists them).
        :param statistic: for a map-level metric ``"best_mean"`` (mean over maps of the best
            partner's value; the default) or ``"pct_well"`` (% of maps whose best value passes
            the threshold); for a layer-level metric (e.g. CKA) ``"value"`` (the default).
        :param model_a: the model whose layers are the rows (its maps look for partners).
        :param model_b: the model whose layers are the columns (default ``model_a``). Both
            None: the run's first comparison.
        :returns: a :class:`matplotlib.figure.Figure` (one heat map and its colour bar; with
            more than 12 layers a second row of std panels). Save it with ``fig.savefig``.

        The cells are the mean and std over images of summary.csv (layer_similarity.csv for a
        layer-level metric); with one image, that image's values (pivot.csv). Undefined cells
        are grey and marked ``n/a``, never drawn as a number.
        """
        from mapsim.plots import heatmaps

        view = self._view(metric)
        pair = self._pair(model_a, model_b)
        if view.granularity == "map":
            statistic = statistic or "best_mean"
            if statistic not in MAP_STATISTICS:
                raise MapsimError(
                    f"statistic {statistic!r} is not drawn for the map-level metric {metric!r}; "
                    f"use one of {', '.join(MAP_STATISTICS)}"
                )
            if not self.has("summary"):
                raise MapsimError(
                    f"{self.root} has no summary.csv, so no heat map of {metric!r}: add the "
                    "pivot aggregator to the spec's aggregators and run again"
                )
            images = self.images()
            sets = heatmaps._map_sets(self, view, statistic, heatmaps._threshold(self, metric),
                                      [pair], images[:1] if len(images) == 1 else [], None,
                                      n_images=len(images))
            wanted: str | None = images[0] if len(images) == 1 else None
        else:
            statistic = statistic or "value"
            if statistic != "value":
                raise MapsimError(
                    f"{metric!r} is a layer-level metric: its heat map shows one value per "
                    f"layer pair; use statistic='value' (or leave it out), not {statistic!r}"
                )
            if not (self.has("layer_similarity") and (
                    self.layer_similarity["metric"].astype(str) == metric).any()):
                raise MapsimError(f"{self.root}: layer_similarity.csv has no rows of {metric!r}")
            sets = heatmaps._layer_sets(self, view, [pair])
            per_image = [s.image for s in sets if s.image not in (None, POOLED_IMAGE)]
            wanted = per_image[0] if len(per_image) == 1 else None
        chosen = [s for s in sets if s.image == wanted]
        if not chosen:
            raise MapsimError(
                f"no {statistic} values of {metric!r} for {pair[0]} → {pair[1]} in {self.root}"
            )
        return heatmaps.draw_set(chosen[0])

    def histogram(self, metric: str = "pearson", model_a: str | None = None,
                  model_b: str | None = None) -> Figure:
        """Histograms of the best-partner values (max.csv, all images) of one comparison
        direction: one panel per layer pair, rows the layers of ``model_a``, columns those of
        ``model_b``; a red line marks the threshold when the run had one.

        :param metric: a map-level metric label of the run.
        :param model_a: the model whose maps look for partners (rows).
        :param model_b: the model whose layers hold the partners (columns; default
            ``model_a``). Both None: the run's first comparison.
        :returns: a :class:`matplotlib.figure.Figure`.
        """
        from mapsim.plots import distributions, heatmaps

        view = self._view(metric)
        if view.granularity != "map":
            raise MapsimError(
                f"{metric!r} is a layer-level metric (one value per layer pair, no best "
                "partners): draw it with .heatmap(metric) instead"
            )
        a, b = self._pair(model_a, model_b)
        if not self.has("max"):
            raise MapsimError(
                f"{self.root} has no max.csv, so no best-partner values to draw: add the max "
                "aggregator to the spec's aggregators and run again"
            )
        fig = distributions.histogram_figure(self, view, a, b, heatmaps._threshold(self, metric))
        if fig is None:
            raise MapsimError(
                f"max.csv of {self.root} has no defined values of {metric!r} for {a} → {b} "
                "(every map dead, or the layers were not compared)"
            )
        return fig

    # ------------------------------------------------------------------ helpers
    def _view(self, metric: str) -> MetricView:
        views = self.metrics()
        if metric not in views:
            raise UnknownNameError("metric", metric, views)
        return views[metric]

    def _pair(self, model_a: str | None, model_b: str | None) -> tuple[str, str]:
        comparisons = self.comparisons()
        if not comparisons:
            raise MapsimError(f"{self.root}/run.json lists no comparisons")
        if model_a is None and model_b is None:
            return comparisons[0]
        if model_a is None:
            raise MapsimError("give model_a too (model_b alone is ambiguous)")
        pair = (model_a, model_b if model_b is not None else model_a)
        if pair not in comparisons:
            shown = ", ".join(f"({a}, {b})" for a, b in comparisons)
            raise MapsimError(
                f"the run did not compare {pair[0]} with {pair[1]}; its comparisons "
                f"(model_a, model_b): {shown}"
            )
        return pair


def open_results(path: str | Path) -> Results:
    """Open a results directory written by :func:`mapsim.run` or ``mapsim run``.

    :param path: the folder (it holds ``run.json`` and the tables).
    :raises mapsim.OutputError: (a :class:`~mapsim.MapsimError`) when the folder does not
        exist, holds no run.json, or its run.json cannot be read.
    """
    return Results.open(path)

