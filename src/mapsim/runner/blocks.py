"""A run in blocks of images: the unit that the processes of a torchrun job share out and that
a resumed run skips.

The images are cut into consecutive blocks of ``engine.block_images``. Each block is done by
one process, which leaves its table rows and a :class:`BlockState` (summaries, pooled moments,
dead-map counts, kept thumbnails) in a folder of the run's partial directory,
``.<results name>.partial/blocks/<index>/``; a block's folder gets its final name only when
the block is complete. At the end the blocks are merged in block order: table rows are
concatenated and the statistics merged with Chan et al.'s update in float64. The blocks do not
depend on how many processes there were, so neither do the results.

Only the main process (rank 0) writes: the other ranks send their rows and states to it (see
:mod:`mapsim.runner.distributed`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import safetensors.numpy
import torch

from mapsim.observers import RunObserver
from mapsim.engine.step import DeadCount, DeadKey
from mapsim.errors import ImageError, OutputError
from mapsim.runner.writer import TableFiles, TablePart, atomic_write_text, check_target
from mapsim.tables.aggregation import SummaryAccumulator
from mapsim.types import Block, Moments

PROGRESS = "progress.json"
STATE = "state.safetensors"
TABLES = "tables.json"


@dataclass(frozen=True)
class ImageBlock:
    """Images ``start`` to ``stop - 1`` of a run, block number ``index``."""

    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_blocks(n_images: int, block_images: int) -> list[ImageBlock]:
    """Consecutive blocks of ``block_images`` images (the last one may be shorter)."""
    return [ImageBlock(k, start, min(start + block_images, n_images))
            for k, start in enumerate(range(0, n_images, block_images))]


def assign_blocks(blocks: list[ImageBlock], done: set[int], world_size: int,
                  rank: int) -> list[ImageBlock]:
    """The blocks ``rank`` does: a contiguous run of the blocks not yet ``done``.

    The ranks get numbers of blocks that differ by at most one, the later ranks the larger
    numbers: only the last block can be short, so the rank that holds it gets the most.
    """
    todo = [b for b in blocks if b.index not in done]
    n = len(todo)
    return [b for k, b in enumerate(todo)
            if world_size - 1 - (n - 1 - k) * world_size // n == rank]


# --------------------------------------------------------------------------- serialisation
def pack(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """JSON-able metadata and named arrays as one safetensors blob (no pickle)."""
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                                  metadata={"mapsim": json.dumps(meta)})


def unpack(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What :func:`pack` packed."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    meta = json.loads(header.get("__metadata__", {}).get("mapsim", "{}"))
    return meta, safetensors.numpy.load(data)


def _prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v for k, v in arrays.items()}


def _under(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    start = prefix + "/"
    return {k[len(start):]: v for k, v in arrays.items() if k.startswith(start)}


def moments_state(moments: Moments) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A host copy of ``moments`` as metadata and float64 arrays."""
    arrays = {"mean": moments.mean, "comoment": moments.comoment}
    if moments.layer_norms is not None:
        arrays |= {"layer_norms": moments.layer_norms, "layer_third": moments.layer_third}
    meta = {"n": int(moments.n),
            "layers": None if moments.layers is None else [list(r) for r in moments.layers]}
    return meta, {k: v.detach().cpu().numpy() for k, v in arrays.items()}


def moments_from_state(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Moments:
    """The :class:`Moments` that :func:`moments_state` described (on the CPU)."""
    t = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    layers = None if meta["layers"] is None else tuple(tuple(r) for r in meta["layers"])
    return Moments(meta["n"], t["mean"], t["comoment"], layers, t.get("layer_norms"),
                   t.get("layer_third"))


@dataclass
class BlockState:
    """What a block leaves besides its table rows."""

    block: ImageBlock
    ids: list[str]
    rank: int = 0
    #: table -> its summary across the block's images
    summaries: dict[str, SummaryAccumulator] = field(default_factory=dict)
    #: comparison group -> moments pooled over the block's images (float64, on the host)
    pooled: dict[int, Moments] = field(default_factory=dict)
    #: comparison group -> the layers of its stacked maps (for the pooled tables)
    layouts: dict[int, list[Block]] = field(default_factory=dict)
    #: dead maps summed over the block's images
    dead_counts: dict[DeadKey, DeadCount] = field(default_factory=dict)
    #: observer key -> what it kept (RunObserver.block_state())
    observers: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = field(
        default_factory=dict)
    #: index of a blockwise metric in the run's metrics -> its Metric.block_state()
    metrics: dict[int, tuple[dict[str, Any], dict[str, np.ndarray]]] = field(
        default_factory=dict)

    def to_bytes(self) -> bytes:
        """The state as one safetensors blob."""
        b = self.block
        meta: dict[str, Any] = {
            "block": [b.index, b.start, b.stop], "ids": self.ids, "rank": self.rank,
            "summaries": {}, "pooled": {},
            "layouts": {str(g): [[x.model, x.layer, x.start, x.stop, list(x.shape)]
                                 for x in blocks] for g, blocks in self.layouts.items()},
            "dead_counts": [[k.metric, k.model, k.layer, v.dead, v.images]
                            for k, v in self.dead_counts.items()],
        }
        arrays: dict[str, np.ndarray] = {}
        for name, summary in self.summaries.items():
            meta["summaries"][name], parts = summary.state()
            arrays |= _prefixed(f"summary/{name}", parts)
        for group, moments in self.pooled.items():
            meta["pooled"][str(group)], parts = moments_state(moments)
            arrays |= _prefixed(f"pooled/{group}", parts)
        meta["observers"] = {}
        for key, (observer_meta, parts) in self.observers.items():
            meta["observers"][key] = observer_meta
            arrays |= _prefixed(f"observer/{key}", parts)
        meta["metrics"] = {}
        for index, (metric_meta, parts) in self.metrics.items():
            meta["metrics"][str(index)] = metric_meta
            arrays |= _prefixed(f"metric/{index}", parts)
        return pack(meta, arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockState:
        """The state :meth:`to_bytes` packed."""
        meta, arrays = unpack(data)
        return cls(
            block=ImageBlock(*meta["block"]), ids=list(meta["ids"]), rank=meta["rank"],
            summaries={name: SummaryAccumulator.from_state(m, _under(f"summary/{name}", arrays))
                       for name, m in meta["summaries"].items()},
            pooled={int(g): moments_from_state(m, _under(f"pooled/{g}", arrays))
                    for g, m in meta["pooled"].items()},
            layouts={int(g): [Block(m, lay, s, e, tuple(shape)) for m, lay, s, e, shape in v]
                     for g, v in meta["layouts"].items()},
            dead_counts={DeadKey(m, mo, lay): DeadCount(d, n)
                         for m, mo, lay, d, n in meta["dead_counts"]},
            observers={key: (m, _under(f"observer/{key}", arrays))
                       for key, m in meta.get("observers", {}).items()},
            metrics={int(i): (m, _under(f"metric/{i}", arrays))
                     for i, m in meta.get("metrics", {}).items()},
        )


@dataclass
class Merged:
    """The blocks of a run merged in order (see :meth:`PartialRun.merge`)."""

    n_images: int = 0
    summaries: dict[str, SummaryAccumulator] = field(default_factory=dict)
    pooled: dict[int, Moments] = field(default_factory=dict)
    layouts: dict[int, list[Block]] = field(default_factory=dict)
    dead_counts: dict[DeadKey, DeadCount] = field(default_factory=dict)
    #: rank -> images its blocks held (by the rank that did each block)
    images_per_rank: dict[int, int] = field(default_factory=dict)

    def add(self, state: BlockState, observers: Sequence[RunObserver] = (),
            metrics: list | None = None) -> None:
        """Merge one block's state after those already merged (``observers`` and
        ``metrics``: the run's, which take in their block states)."""
        self.n_images += len(state.ids)
        for name, summary in state.summaries.items():
            if name in self.summaries:
                self.summaries[name].merge(summary)
            else:
                self.summaries[name] = summary
        for group, moments in state.pooled.items():
            previous = self.pooled.get(group)
            self.pooled[group] = moments if previous is None else previous.merge(moments)
        for group, layout in state.layouts.items():
            self.layouts.setdefault(group, layout)
        for key, count in state.dead_counts.items():
            self.dead_counts.setdefault(key, DeadCount()).add(count)
        for observer in observers:
            if observer.key in state.observers:
                observer.add_block_state(*state.observers[observer.key])
        for index, (meta, arrays) in state.metrics.items():
            if metrics is None:
                raise OutputError("a block holds a metric's state but no metrics take it in")
            metrics[index].add_block_state(meta, arrays)


class BlockOutput(ABC):
    """Where one rank's table rows and block states go. They arrive in the order of
    ``blocks``: the rows of a block, then its state (:meth:`commit`), then the next block."""

    def __init__(self, blocks: list[ImageBlock]) -> None:
        self.blocks = list(blocks)
        self._next = 0

    @property
    def current(self) -> ImageBlock:
        """The block being written."""
        if self._next >= len(self.blocks):
            raise OutputError("table rows arrived after this process's last block")
        return self.blocks[self._next]

    def part(self, part: TablePart) -> None:
        """Rows of the current block."""
        self._part(self.current.index, part)

    def commit(self, state: BlockState) -> None:
        """The state of the current block, which is then complete."""
        if state.block != self.current:
            raise OutputError(f"block {state.block.index} finished while block "
                              f"{self.current.index} was being written")
        self._commit(state)
        self._next += 1

    @abstractmethod
    def _part(self, index: int, part: TablePart) -> None:
        """Store or send rows of block ``index``."""

    @abstractmethod
    def _commit(self, state: BlockState) -> None:
        """Store or send the state of a finished block."""

    def finish(self) -> None:
        """After the last block."""

    def abort(self) -> None:
        """After a failure: nothing more comes."""


class LocalBlocks(BlockOutput):
    """Rank 0's own blocks, written into the partial directory."""

    def __init__(self, blocks: list[ImageBlock], partial: PartialRun) -> None:
        super().__init__(blocks)
        self.partial = partial

    def _part(self, index: int, part: TablePart) -> None:
        self.partial.part(index, part)

    def _commit(self, state: BlockState) -> None:
        self.partial.commit(state)


# --------------------------------------------------------------------------- the partial folder
class PartialRun:
    """The partial directory of a run, ``.<results name>.partial`` beside the results.

    It holds ``progress.json`` (which spec and images it belongs to, and how far the rows
    are), ``blocks/<index>/`` (one folder per finished block: its state and, until they are
    moved on, its table rows) and ``results/``, the results being assembled. A block's rows
    go straight into ``results/`` when every block before it is there (on one process, every
    block: the rows are written once); a block that finishes out of order (another rank's)
    keeps its rows in its folder until the blocks before it are in, and is then appended.
    Only rank 0 uses it.

    ``resume``: keep the finished blocks of an earlier run of the same spec (the spec's sha256,
    the number of images and the block size must match); otherwise an earlier partial
    directory is removed and the run starts afresh. ``overwrite`` and ``protect``: see
    :func:`~mapsim.runner.writer.check_target`.
    """

    def __init__(self, target: Path, spec_sha256: str, n_images: int, block_images: int,
                 resume: bool = False, overwrite: bool = False,
                 protect: Sequence[Path] = ()) -> None:
        self.target = Path(target).resolve()
        self.folder = self.target.with_name(f".{self.target.name}.partial")
        self.blocks = self.folder / "blocks"
        self.progress = {"spec_sha256": spec_sha256, "n_images": n_images,
                         "block_images": block_images}
        self.done: set[int] = set()
        #: the results being assembled: the rows of blocks 0 to in_rows - 1, in order
        self.rows = TableFiles(self.folder / "results")
        self.in_rows = 0
        self._open: dict[int, TableFiles] = {}
        self._direct: int | None = None  # the block being written straight into the rows
        self._lock = threading.Lock()
        self._closed = False  # after remove() or keep_or_remove(): no more blocks
        if resume and not self.folder.exists() and _complete(self.target):
            raise OutputError(
                f"nothing to resume: the run in {self.target} is complete. Pass --overwrite "
                "(without --resume) to run it again."
            )
        check_target(self.target, overwrite, protect)
        if resume and self.folder.exists():
            self._resume()
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.blocks.mkdir(parents=True, exist_ok=True)
            self.rows.folder.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._save_progress()
                self._append_ready()
        except OSError as exc:
            raise OutputError(f"cannot create the partial directory {self.folder}: {exc}") \
                from exc

    def _resume(self) -> None:
        try:
            earlier = json.loads((self.folder / PROGRESS).read_text())
        except (OSError, ValueError) as exc:
            raise OutputError(
                f"cannot resume from {self.folder}: its {PROGRESS} is unreadable ({exc}). "
                "Remove that folder, or run without --resume to start afresh."
            ) from exc
        for key, value in self.progress.items():
            if earlier.get(key) != value:
                what = {"spec_sha256": "the spec has changed",
                        "n_images": "the number of images has changed",
                        "block_images": "engine.block_images has changed"}[key]
                raise OutputError(
                    f"cannot resume from {self.folder}: {what} since that run ({key} "
                    f"{earlier.get(key)!r}, now {value!r}). Run without --resume to start "
                    "afresh."
                )
        self.in_rows = int(earlier.get("in_rows", 0))
        sizes: dict[str, int] = earlier.get("sizes", {})
        self.rows.headers = {t: list(c) for t, c in earlier.get("headers", {}).items()}
        # the rows as they were when in_rows was saved: cut what came after, drop the rest
        for path in sorted(self.rows.folder.rglob("*"), reverse=True):
            table = path.relative_to(self.rows.folder).with_suffix("").as_posix()
            if path.is_file() and path.suffix == ".csv" and table in sizes:
                if path.stat().st_size < sizes[table]:
                    raise OutputError(f"cannot resume from {self.folder}: {path} is shorter "
                                      "than recorded. Run without --resume to start afresh.")
                os.truncate(path, sizes[table])
            elif path.is_file():
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        missing = set(sizes) - {t for t in sizes if (self.rows.folder / f"{t}.csv").exists()}
        if missing:
            raise OutputError(f"cannot resume from {self.folder}: the rows of "
                              f"{sorted(missing)} are missing. Run without --resume to start "
                              "afresh.")
        for path in self.blocks.iterdir() if self.blocks.exists() else ():
            index = int(path.name) if path.name.isdigit() else -1
            finished = (path / STATE).exists() and (index < self.in_rows
                                                     or (path / TABLES).exists())
            if finished:
                self.done.add(index)
            else:  # a block that was being written when the run stopped
                shutil.rmtree(path, ignore_errors=True)

    def _save_progress(self) -> None:
        """Record how far the rows are (with the lock held)."""
        sizes = {t: (self.rows.folder / f"{t}.csv").stat().st_size for t in self.rows.headers}
        atomic_write_text(self.folder / PROGRESS, json.dumps(
            self.progress | {"in_rows": self.in_rows, "sizes": sizes,
                             "headers": self.rows.headers}, indent=2))

    def block_folder(self, index: int) -> Path:
        """Where a finished block lies."""
        return self.blocks / f"{index:06d}"

    def _files(self, index: int) -> TableFiles:
        """Where the rows of block ``index`` go while it is written: the results, when every
        block before it is there, else a hidden folder of its own."""
        with self._lock:
            if self._closed:
                raise OutputError(f"the run has stopped; block {index} is not kept")
            files = self._open.get(index)
            if files is None:
                if index == self.in_rows and self._direct is None:
                    self._direct, files = index, self.rows
                else:
                    folder = self.blocks / f".{index:06d}.tmp"
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                    files = TableFiles(folder)
                self._open[index] = files
            return files

    def part(self, index: int, part: TablePart) -> None:
        """Append table rows to block ``index``."""
        self._files(index).append_part(part)

    def commit(self, state: BlockState) -> None:
        """Finish a block: write its state (and where its rows are), then give its folder the
        final name; then move on the rows of the blocks that follow, if they are done."""
        index = state.block.index
        files = self._files(index)
        direct = files is self.rows
        folder = self.blocks / f".{index:06d}.tmp"
        if direct:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        else:
            atomic_write_text(folder / TABLES, json.dumps(files.headers))
        (folder / STATE).write_bytes(state.to_bytes())
        with self._lock:
            if self._closed:
                raise OutputError(f"the run has stopped; block {index} is not kept")
            os.replace(folder, self.block_folder(index))
            del self._open[index]
            self.done.add(index)
            if direct:
                self._direct, self.in_rows = None, index + 1
                self._save_progress()
            self._append_ready()

    def _append_ready(self) -> None:
        """Append the rows of finished blocks that are next in order (with the lock held)."""
        while self.in_rows in self.done:
            folder = self.block_folder(self.in_rows)
            tables = json.loads((folder / TABLES).read_text())
            for table, columns in tables.items():
                self.rows.append_file(table, columns, folder / f"{table}.csv")
            self.in_rows += 1
            self._save_progress()
            for table in tables:
                (folder / f"{table}.csv").unlink()
            (folder / TABLES).unlink()

    def state(self, index: int) -> BlockState:
        """The state of a finished block."""
        return BlockState.from_bytes((self.block_folder(index) / STATE).read_bytes())

    def merge(self, blocks: list[ImageBlock], observers: Sequence[RunObserver] = (),
              metrics: list | None = None) -> Merged:
        """Merge the states of every block, in block order (``observers`` and ``metrics``
        take in their block states); their rows are in :attr:`rows`."""
        if self.in_rows != len(blocks):
            first = min(set(range(len(blocks))) - self.done, default=self.in_rows)
            block = blocks[first]
            raise OutputError(f"block {block.index} (images {block.start} to "
                              f"{block.stop - 1}) was never finished")
        merged = Merged()
        seen: dict[str, int] = {}
        for block in blocks:
            state = self.state(block.index)
            for offset, image_id in enumerate(state.ids):
                if image_id in seen:
                    raise ImageError(f"two images have the id {image_id!r} (images "
                                     f"{seen[image_id]} and {block.start + offset}); image ids "
                                     "must be unique")
                seen[image_id] = block.start + offset
            merged.add(state, observers, metrics)
            merged.images_per_rank[state.rank] = (merged.images_per_rank.get(state.rank, 0)
                                                  + len(state.ids))
        return merged

    def remove(self) -> None:
        """Delete the partial directory (after the results are published)."""
        with self._lock:
            self._closed = True
        shutil.rmtree(self.folder, ignore_errors=True)

    def keep_or_remove(self) -> str | None:
        """After a failure: keep the folder if a block was finished (returns a note on how to
        resume), else remove it."""
        with self._lock:
            self._closed = True
        if not self.done:
            self.remove()
            return None
        for path in self.blocks.glob(".*.tmp"):
            shutil.rmtree(path, ignore_errors=True)
        return (f"the {len(self.done)} finished block(s) of this run are kept in {self.folder}; "
                "run the same command again with --resume to continue from there.")


def _complete(target: Path) -> bool:
    return (target / "run.json").exists()
