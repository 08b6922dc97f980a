"""From similarity matrices to formatted table parts, in whatever process has time for it.

The main loop of a run hands out two kinds of jobs (and block marks, passed through): a finished table part
(:class:`FrameJob`: dead-map counts, layer values) and a similarity matrix to aggregate
(:class:`AggregateJob`: the study's tables, the bulk of the rows). :class:`TableWork` turns
either into :class:`~mapsim.runner.writer.TablePart` objects (CSV rows without a header) and
hands back the frames that are summarised across images. It runs in the writer processes of
:class:`mapsim.runner.pipeline.ProcessSink` (inherited when they are forked, so aggregator
plugins are never pickled) or in the writer thread; the parts are written in the order the
jobs were queued either way, so the results do not depend on where the work ran.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from mapsim.tables import aggregation
from mapsim.tables.aggregation import SummaryRows, summary_rows
from mapsim.api import Aggregator
from mapsim.runner.pairs import PARQUET, arrow_part, is_pairs_table, unordered_rows
from mapsim.runner.writer import TablePart, format_part
from mapsim.engine.null import TABLE_PREFIX as NULL_PREFIX, TABLES as NULL_TABLES
from mapsim.engine.similarity import SimilarityMatrix

#: the aggregators whose tables the spatial null's chance tables read (max, pivot)
NULL_AGGREGATORS = ("max", "threshold", "pivot")

#: columns of a table that are not summarised across images (besides the keys): the image,
#: and layer_similarity.csv's permutation p-value (``cka`` over images only)
SKIP = {"layer_similarity": ("image", "p")}


@dataclass
class FrameJob:
    """Rows of one table, ready to be written."""

    table: str
    frame: pd.DataFrame


@dataclass
class AggregateJob:
    """One image's similarity matrix for one metric and direction, to be aggregated."""

    image_id: str
    sim: SimilarityMatrix
    #: put before every table name (e.g. ``pooled/``)
    prefix: str = ""


@dataclass(frozen=True)
class BlockMark:
    """The end of a block of images (:mod:`mapsim.runner.blocks`): passed through unchanged,
    so that it is delivered after every table of the block."""

    index: int


@dataclass
class WorkResult:
    """What one job gave: the parts to append, what the tables summarised across images add
    to their summaries (``(table, rows)``, in order) and the seconds spent aggregating."""

    parts: list[TablePart]
    summarised: list[tuple[str, SummaryRows]]
    seconds: float = 0.0


def aggregate_tables(aggregators: Sequence[Aggregator], sim: SimilarityMatrix,
                     pairs: bool = False) -> dict[str, pd.DataFrame]:
    """Every aggregator's tables for one similarity matrix (and the ``pairs`` table when
    asked for), without the image column."""
    tables: dict[str, pd.DataFrame] = {}
    for aggregator in aggregators:
        tables.update(aggregator.aggregate(sim, tables))
    if pairs:
        tables["pairs"] = aggregation.pairs_table(sim)
    return tables


def with_image(frame: pd.DataFrame, image_id: str, aligned: str | None = None
               ) -> pd.DataFrame:
    """``frame`` with a first column ``image`` (a categorical: one string, stored once) and,
    when the maps were aligned (``engine.align``), a second column ``aligned``."""
    frame = frame.copy(deep=False)  # only adds a column
    frame.insert(0, "image", aggregation.constant_column(image_id, len(frame)))
    if aligned is not None:
        frame.insert(1, "aligned", aggregation.constant_column(aligned, len(frame)))
    return frame


class TableWork:
    """Turns jobs into table parts (see the module docstring)."""

    def __init__(self, aggregators: Sequence[Aggregator], pairs: bool | str,
                 summarised: Mapping[str, Sequence[str]]) -> None:
        self.aggregators = list(aggregators)
        #: what the spatial null's matrices need: the best partners, threshold and pivot
        self.null_aggregators = [a for a in self.aggregators if a.name in NULL_AGGREGATORS]
        self.pairs = pairs
        #: table -> key columns of its summary across images
        self.summarised = dict(summarised)

    def __call__(self, job: FrameJob | AggregateJob | BlockMark) -> WorkResult | BlockMark:
        if isinstance(job, BlockMark):
            return job
        seconds = 0.0
        if isinstance(job, FrameJob):
            frames = [(job.table, job.frame)]
        else:
            start = time.perf_counter()
            null = job.prefix.startswith(NULL_PREFIX)  # the spatial null: max and pivot only
            aggregators = self.null_aggregators if null else self.aggregators
            tables = aggregate_tables(aggregators, job.sim, bool(self.pairs) and not null)
            if self.pairs == PARQUET and "pairs" in tables:  # each unordered pair once
                keep = unordered_rows(job.sim)
                if keep is not None:
                    tables["pairs"] = tables["pairs"][keep]
            if null:
                tables = {k: v for k, v in tables.items() if k in NULL_TABLES}
            frames = [(job.prefix + name, with_image(frame, job.image_id, job.sim.aligned))
                      for name, frame in tables.items()]
            seconds = time.perf_counter() - start
        frames = [(name, frame) for name, frame in frames if not frame.empty]
        summarised = [(name, summary_rows(frame, self.summarised[name], skip=SKIP.get(
            name, ("image",)))) for name, frame in frames if name in self.summarised]
        return WorkResult(
            parts=[arrow_part(name, frame) if self.pairs == PARQUET and is_pairs_table(name)
                   else format_part(name, frame) for name, frame in frames],
            summarised=[(name, rows) for name, rows in summarised if rows is not None],
            seconds=seconds,
        )
