"""Run a validated spec: the runner orders the stages, block after block of images.

models (:mod:`mapsim.models.prepare`) -> images (the dataset plugin) -> one
:class:`~mapsim.engine.step.ImageStep` per image -> the sink (:mod:`mapsim.runner.sinks`:
tables built in worker processes) -> blocks (:mod:`mapsim.runner.blocks`: partial directory,
``--resume``, torchrun) -> :func:`~mapsim.runner.publish.merge_and_publish`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mapsim.api import ImageItem
from mapsim.observers import RunObserver
from mapsim.devices import resolve_device
from mapsim.engine.null import TABLE_PREFIX as NULL_PREFIX
from mapsim.engine.step import DeadCount, DeadKey, GroupMoments, ImageResult, LaunchedImage
from mapsim.errors import ImageError, SpecError
from mapsim.registry import Registry
from mapsim.runner.blocks import (
    BlockState,
    ImageBlock,
    LocalBlocks,
    PartialRun,
    assign_blocks,
    plan_blocks,
)
from mapsim.runner.distributed import STOP_WAIT_S, Inbox, RemoteBlocks, World
from mapsim.runner.lock import RunLock, results_target
from mapsim.runner.pairs import require_pyarrow
from mapsim.runner.pipeline import prefetch
from mapsim.runner.publish import RunResult, merge_and_publish
from mapsim.runner.setup import RunSetup
from mapsim.runner.sinks import Sink, table_sink
from mapsim.types import Block, Moments

__all__ = ["Runner", "RunResult", "run"]


@dataclass
class InFlight:
    """An image launched on the fast path whose tables are not out yet, and the state of
    the block it closes (taken at launch, so its pooled moments are that block's)."""

    launched: LaunchedImage
    closing: BlockState | None


class Runner:
    """Orders one process's images: each through the :class:`~mapsim.engine.step.ImageStep`,
    its frames and matrices to the sink, its moments into the block's pooled moments, the
    observers told; at the end of a block, the block's state to the sink.

    Use :func:`run` unless you need the pieces.
    """

    def __init__(self, spec: Any, base_dir: Path, device: str | None = None,
                 registry: Registry | None = None,
                 observers: Sequence[RunObserver] = ()) -> None:
        self.setup = RunSetup(spec, base_dir, device, registry)
        self.spec = spec
        self.observers = list(observers)
        self.timings = self.setup.timings
        self.step = self.setup.step
        self.pooled: dict[int, Moments] = {}
        self.layouts: dict[int, list[Block]] = {}
        self.dead_counts: dict[DeadKey, DeadCount] = {}
        self._in_flight: InFlight | None = None
        self._block_ids: list[str] = []  # ids of the images of the block being done

    def check(self, base_dir: Path) -> Any:
        """Everything short of running: build models, resolve layers, find the images."""
        return self.setup.check(base_dir)

    def streams(self, index: int | None) -> bool:
        """Whether image ``index`` takes the fast path: not when an observer needs its maps
        (the pictures keep only the first ``output.plot_images`` images' maps)."""
        place = 0 if index is None else index
        return self.step.streamable and not any(o.wants_maps(place) for o in self.observers)

    def submit(self, item: ImageItem, sink: Sink, index: int | None = None,
               closes: ImageBlock | None = None) -> None:
        """Start one image. On the fast path its tables are emitted at the next :meth:`submit`
        or :meth:`flush`, so the device computes this image while the host finishes the last.

        ``index``: the image's place in the run. ``closes``: the block this image ends;
        after its tables, the block's state goes to ``sink.end_block``.
        """
        self._block_ids.append(item.id)
        launched = self.step.launch(item, index) if self.streams(index) else None
        if launched is not None:
            for group in launched.groups:
                self._pool(group)  # on the device, queued like the rest
            closing = None if closes is None else self._take_block(closes, host=True)
            previous, self._in_flight = self._in_flight, InFlight(launched, closing)
            if previous is not None:
                self._complete(previous, sink)
            return
        self.flush(sink)  # keep the images' tables in order
        place = 0 if index is None else index
        needs_maps = any(o.wants_maps(place) for o in self.observers)
        result = self.step.compute(item, keep_maps=needs_maps, index=index)
        if result.maps is not None:
            for observer in self.observers:
                observer.on_maps(place, item, result.maps)
            result.maps = None
        self._deliver(result, sink)
        for group in result.groups:
            self._pool(group)
        if closes is not None:
            self._close_block(self._take_block(closes, host=False), sink)

    def flush(self, sink: Sink) -> None:
        """Emit the tables of the image still in flight, if any."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            self._complete(in_flight, sink)

    def _complete(self, in_flight: InFlight, sink: Sink) -> None:
        self._deliver(self.step.complete(in_flight.launched), sink)
        if in_flight.closing is not None:
            self._close_block(in_flight.closing, sink)

    def _deliver(self, result: ImageResult, sink: Sink) -> None:
        """An image's frames and matrices to the sink (matrices to the observers too)."""
        for name, frame in result.frames:
            sink.frame(name, frame)
        for sim in result.matrices:
            for observer in self.observers:
                observer.on_matrix(result.image_id, sim)
            sink.aggregate(result.image_id, sim)
        if result.null:  # the spatial null's matrices: their tables go under null/
            null = sink.prefixed(NULL_PREFIX)  # type: ignore[attr-defined]
            for sim in result.null:
                null.aggregate(result.image_id, sim)
        for key, count in result.dead_counts.items():
            self.dead_counts.setdefault(key, DeadCount()).add(count)

    def _pool(self, group: GroupMoments) -> None:
        """Merge one image's moments of a group into the block's pooled moments."""
        if not self.spec.engine.pooled:
            return
        previous = self.pooled.get(group.index)
        moments = group.device_moments
        self.pooled[group.index] = moments if previous is None else previous.merge(moments)
        self.layouts.setdefault(group.index, group.stack.blocks)

    def _take_block(self, block: ImageBlock, host: bool) -> BlockState:
        """The block's pooled moments and image ids, which then start afresh. ``host``: copy
        the moments to the host without waiting (valid once the work queued so far is done),
        else copy them now."""
        state = BlockState(block, ids=self._block_ids,
                           pooled={g: m.to("cpu", non_blocking=host)
                                   for g, m in self.pooled.items()},
                           layouts=dict(self.layouts))
        self._block_ids, self.pooled = [], {}
        return state

    def _close_block(self, state: BlockState, sink: Sink) -> None:
        """After the block's last tables: its dead-map counts, what the observers and the
        blockwise metrics kept, then the state to the sink."""
        state.dead_counts, self.dead_counts = self.dead_counts, {}
        state.observers = {o.key: o.block_state() for o in self.observers}
        state.metrics = {i: m.block_state() for i, m in enumerate(self.setup.metrics)
                         if m.accumulates and m.blockwise}
        sink.end_block(state)


def run(spec: Any, *, base_dir: str | Path = ".", out_dir: str | Path | None = None,
        device: str | None = None, overwrite: bool = False, resume: bool = False,
        progress: bool = True, registry: Registry | None = None,
        observers: Sequence[RunObserver] = ()) -> RunResult:
    """Run a validated spec and write its results directory.

    Relative paths inside the spec resolve against ``base_dir`` (the spec file's folder);
    ``out_dir`` defaults to the spec's ``output.dir``, else ``results/<name>``.

    The images are done in blocks of ``engine.block_images``, each kept in the partial
    directory beside the results until all are done. ``resume``: skip the blocks that an
    interrupted run of the same spec finished. Started by torchrun, every process runs this
    on its share of the blocks and rank 0 writes (see :mod:`mapsim.runner.distributed`); the
    results are the same as one process's.

    ``observers`` watch the run (:class:`mapsim.RunObserver`; the pictures are one): they see
    every image's maps and matrices, write into the results before they are published, and
    are told the published directory when the run is done (rank 0 only).
    """
    started = time.perf_counter()
    require_pyarrow(spec.output.pairs)  # output.pairs: parquet, refused before any work
    base_dir = Path(base_dir)
    target = Path(out_dir) if out_dir is not None else (
        base_dir / spec.output.dir if spec.output.dir else Path("results") / spec.name
    )
    world = World.from_env()
    setup_error: BaseException | None = None
    values: dict[str, int] = {}
    runner = dataset = None
    try:
        chosen = world.device(resolve_device(device or spec.device))
        world.start(chosen)
    except BaseException:
        world.close()
        raise
    try:
        try:  # everything that can fail on one rank only, before the ranks meet
            runner = Runner(spec, base_dir, device=str(chosen), registry=registry,
                            observers=observers)
            dataset = runner.setup.dataset(base_dir)
            values = {"images": len(dataset), "spec": int(spec.digest()[:15], 16)}
        except Exception as exc:  # noqa: BLE001 - raised by agree(), on this rank
            setup_error = exc
        world.agree(setup_error, values)
        result = _run_blocks(spec, world, runner, dataset, target, overwrite, resume, progress,
                             started)
    except BaseException as exc:
        world.fail(exc)
        if world.stop_together():
            world.close()
        raise
    world.close()
    if world.main:
        for observer in observers:
            observer.finished(result.out_dir)
    return result


def _run_blocks(spec: Any, world: World, runner: Runner, dataset: Any, target: Path,
                overwrite: bool, resume: bool, progress: bool, started: float) -> RunResult:
    """A run's blocks on this rank; on rank 0 also the merge and the results directory,
    holding the results' lock (one writer per results directory)."""
    if not world.main:
        return _blocks(spec, world, runner, dataset, target, overwrite, resume, progress,
                       started)
    target = results_target(target)
    with RunLock(target):
        return _blocks(spec, world, runner, dataset, target, overwrite, resume, progress,
                       started)


def _blocks(spec: Any, world: World, runner: Runner, dataset: Any, target: Path,
            overwrite: bool, resume: bool, progress: bool, started: float) -> RunResult:
    n_total = len(dataset)
    if n_total == 0:
        raise ImageError("the images entry gave no images")
    blocks = plan_blocks(n_total, spec.engine.block_images)
    partial = None
    if world.main:
        partial = PartialRun(target, spec.digest(), n_total, spec.engine.block_images,
                             resume=resume, overwrite=overwrite,
                             protect=[runner.setup.base_dir])
        done = set(partial.done)
        world.share("done", json.dumps(sorted(done)))
    else:
        done = set(json.loads(world.shared("done")))
    mine = assign_blocks(blocks, done, world.size, world.rank)
    output = LocalBlocks(mine, partial) if world.main else RemoteBlocks(mine, world)
    inbox = Inbox(world, partial) if world.main and world.distributed else None
    try:
        metrics = runner.setup.metrics
        if done and any(m.accumulates and not m.blockwise for m in metrics):
            raise SpecError(_cannot_share("resume an interrupted run", runner))
        if world.size > 1 and any(m.accumulates and not m.blockwise for m in metrics):
            raise SpecError(_cannot_share(f"run in {world.size} processes", runner))
        for metric in metrics:
            if metric.accumulates and metric.blockwise:
                metric.start_blocks()
        n_mine = sum(b.size for b in mine)
        # The worker processes that build the tables are forked before the models are built
        # and moved to a GPU: the workers hold no device state, and this process then shares
        # few pages with them, so it takes few copy-on-write faults (forking later slowed the
        # H100 main loop by ~25%).
        sink = table_sink(runner.setup.aggregators, spec.output.pairs, output, n_mine,
                          runner.timings)
        try:
            runner.setup.prepare_models()
            start = time.perf_counter()
            runner.timings["setup"] = start - started
            ids: set[str] = set()
            label = spec.name if not world.distributed else f"{spec.name} [{world.rank}]"
            bar = tqdm(total=n_mine, desc=label, unit="image",
                       disable=not progress or not world.main)
            for block, index, item in prefetch(block_items(dataset, mine), depth=2):
                world.check()
                if index == block.start:
                    for metric in metrics:
                        if metric.accumulates and metric.blockwise:
                            metric.start_block(block.start, n_total)
                if item.id in ids:
                    raise ImageError(
                        f"two images have the id {item.id!r}; image ids must be unique")
                ids.add(item.id)
                runner.submit(item, sink, index=index,
                              closes=block if index == block.stop - 1 else None)
                bar.update()
            bar.close()
            runner.flush(sink)
        except BaseException:
            # the image in flight may end a block (e.g. reading the next one failed): finish
            # it, so that the block is kept for --resume
            with contextlib.suppress(Exception):
                runner.flush(sink)
            # the table workers finish what is queued; what they report then (e.g. a job cut
            # short by the interrupt) must not hide the error that stopped the run
            with contextlib.suppress(Exception):
                sink.close()
            raise
        closing = time.perf_counter()
        sink.close()  # the table workers finish what is queued
        runner.timings["wait_for_workers"] += time.perf_counter() - closing
        output.finish()
        runner.timings["images"] = time.perf_counter() - start
        if not world.main:
            world.shared("finished")
            return RunResult(target.resolve(), n_total, [], {})
        if inbox is not None:
            waiting = time.perf_counter()
            inbox.wait()
            runner.timings["wait_for_ranks"] = time.perf_counter() - waiting
        return merge_and_publish(runner.setup, world, partial, blocks, done, overwrite,
                                 started, runner.observers,
                                 probe_on=dataset if spec.engine.precision_probe else None)
    except BaseException as exc:
        world.fail(exc)  # before the abort: rank 0 then reports this error, not a lost link
        output.abort()
        if inbox is not None:  # the other ranks' blocks that are on their way
            inbox.join(STOP_WAIT_S)
        if partial is not None:
            note = partial.keep_or_remove()
            if note is not None and hasattr(exc, "add_note"):
                exc.add_note(note)
        raise



def block_items(dataset: Any, blocks: list[ImageBlock]) -> Iterator[tuple[ImageBlock, int, Any]]:
    """``(block, image index, image)`` for every image of ``blocks``, in order."""
    for block in blocks:
        count = 0
        for count, item in enumerate(dataset.slice(block.start, block.stop), start=1):
            yield block, block.start + count - 1, item
        if count != block.size:
            raise ImageError(
                f"the dataset has {len(dataset)} images but gave {count} for images "
                f"{block.start} to {block.stop - 1}; a dataset must give as many images as "
                "its length"
            )


def _cannot_share(what: str, runner: Runner) -> str:
    names = ", ".join(m.label for m in runner.setup.metrics if m.accumulates and not m.blockwise)
    return (f"cannot {what}: metric {names} accumulates over all images in one process and "
            "cannot take them in blocks (its plugin has no blockwise support). Run it in one "
            "process without --resume, or leave it out")


