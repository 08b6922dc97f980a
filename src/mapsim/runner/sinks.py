"""Where a run's per-image tables go: the :class:`Sink` protocol and the run's sink.

The runner hands every image's frames and similarity matrices to a sink; the sink builds the
aggregators' tables in worker processes (or a thread) and delivers the formatted parts, in
the order they were queued, to an output: a block of the run
(:class:`~mapsim.runner.blocks.BlockOutput`) or the results writer (:class:`WriterOutput`).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import pandas as pd

from mapsim.api import Aggregator
from mapsim.runner.blocks import BlockOutput, BlockState
from mapsim.runner.pipeline import make_sink
from mapsim.runner.tablework import (
    AggregateJob,
    BlockMark,
    FrameJob,
    TableWork,
    WorkResult,
)
from mapsim.runner.writer import TablePart
from mapsim.tables import aggregation
from mapsim.types import SimilarityMatrix


class Sink(Protocol):
    """What the runner writes an image's results to."""

    def frame(self, name: str, frame: pd.DataFrame) -> None:
        """Finished rows of the table ``name`` (e.g. ``dead_maps``, ``layer_similarity``)."""

    def aggregate(self, image_id: str, sim: SimilarityMatrix) -> None:
        """One similarity matrix, for the aggregators' tables."""

    def end_block(self, state: BlockState) -> None:
        """The end of a block of images, after every table of its images."""

    def close(self) -> None:
        """Wait until everything is written; raise the first error, if any."""


class PartOutput(Protocol):
    """Where formatted table parts go when they belong to no block."""

    def part(self, part: TablePart) -> None: ...


class RunSink:
    """Where a run's per-image tables go: into ``background`` (a sink of
    :mod:`mapsim.runner.pipeline` running :class:`~mapsim.runner.tablework.TableWork`), as finished
    frames or as matrices to aggregate there."""

    def __init__(self, background: Any, timings: dict[str, float], prefix: str = "",
                 states: dict[int, BlockState] | None = None) -> None:
        self.background = background
        self.timings = timings
        self.prefix = prefix
        #: block index -> the runner's part of its state, until the block's mark is delivered
        self.states = {} if states is None else states

    def frame(self, name: str, frame: pd.DataFrame) -> None:
        """Queue finished rows of one table."""
        self._put(FrameJob(self.prefix + name, frame))

    def aggregate(self, image_id: str, sim: SimilarityMatrix) -> None:
        """Queue one matrix for the aggregators."""
        self._put(AggregateJob(image_id, sim, self.prefix))

    def prefixed(self, prefix: str) -> RunSink:
        """The same sink, with ``prefix`` before every table name (e.g. ``pooled/``)."""
        return RunSink(self.background, self.timings, self.prefix + prefix, self.states)

    def end_block(self, state: BlockState) -> None:
        """Queue the end of a block, after every table of its images."""
        self.states[state.block.index] = state
        self._put(BlockMark(state.block.index))

    def _put(self, job: Any) -> None:
        start = time.perf_counter()
        self.background.put(job)
        self.timings["write"] += time.perf_counter() - start  # queueing; the work overlaps

    def close(self) -> None:
        """Wait until every table part is written; raise the first error, if any."""
        self.background.close()



def summary_accumulators(aggregators: list[Aggregator]) -> dict[str, Any]:
    """One across-image summary per table the aggregators summarise, and layer values."""
    summaries = {table: aggregation.SummaryAccumulator(keys)
                 for aggregator in aggregators for table, keys in aggregator.summarise.items()}
    summaries["layer_similarity"] = aggregation.SummaryAccumulator(
        ("metric", "model_a", "layer_a", "model_b", "layer_b"))
    return summaries


def table_sink(aggregators: list[Aggregator], pairs: bool | str,
               output: BlockOutput | PartOutput,
               n_images: int, timings: dict[str, float]) -> RunSink:
    """The sink of a rank's per-image tables: they are built and formatted in worker
    processes (or a thread) and go to ``output`` in the order they were queued (a
    :class:`~mapsim.runner.blocks.BlockOutput`, or anything with ``part``), where the tables
    summarised across images update the block's summaries in that order too."""
    summarised = summary_accumulators(aggregators)
    work = TableWork(aggregators, pairs,
                     {name: summary.keys for name, summary in summarised.items()})
    summaries = [summarised]  # the current block's
    states: dict[int, BlockState] = {}

    def deliver(result: WorkResult | BlockMark) -> None:
        if isinstance(result, BlockMark):
            state = states.pop(result.index)
            state.summaries, summaries[0] = summaries[0], summary_accumulators(aggregators)
            output.commit(state)
            return
        for part in result.parts:
            output.part(part)
        for name, rows in result.summarised:
            summaries[0][name].add_rows(rows)
        timings["aggregate_behind"] += result.seconds

    return RunSink(make_sink(work, deliver, n_images), timings, states=states)


class WriterOutput:
    """A results writer as a sink's output (tables that belong to no block)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def part(self, part: TablePart) -> None:
        """Append one formatted part to its table."""
        self.writer.append_part(part)
