"""Overlap for a run: images read ahead in a thread, tables written behind in a thread or in
forked writer processes.

Both keep the order of their items and hand any exception back to the caller: a failure while
reading an image is raised where that image would have been returned, and a failure while
writing is raised at the next :meth:`BackgroundSink.put` or at :meth:`BackgroundSink.close`.
Queues are bounded, so memory stays flat however many images a run has.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mapsim.core.errors import OutputError

_DONE = object()


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Yield ``items`` in order, producing up to ``depth`` ahead in a background thread."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((True, _DONE))
        except BaseException as exc:  # handed to the consumer, raised there
            slots.put((False, exc))

    thread = threading.Thread(target=produce, name="mapsim-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = slots.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let a blocked producer see the stop flag
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass


class BackgroundSink:
    """Calls ``write(name, frame)`` for each :meth:`put`, in order, in one background thread."""

    def __init__(self, write: Callable[[str, Any], None], depth: int = 64) -> None:
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mapsim-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _DONE:
                return
            if self._error is None:
                try:
                    self._write(*job)
                except BaseException as exc:  # raised in the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, name: str, frame: Any) -> None:
        """Queue one table part for writing (blocks while the queue is full)."""
        self._raise()
        self._queue.put((name, frame))

    def close(self) -> None:
        """Wait until everything queued is written; raise the first write error, if any."""
        self._queue.put(_DONE)
        self._thread.join()
        self._raise()


def _write_worker(write: Callable[[str, Any], None], jobs: Any, errors: Any) -> None:
    failed = False
    while True:
        job = jobs.get()
        if job is None:
            return
        if failed:
            continue
        try:
            write(*job)
        except BaseException as exc:  # reported to the parent, which raises it
            errors.put(f"{type(exc).__name__}: {exc}")
            failed = True


class ProcessSink:
    """Like :class:`BackgroundSink`, but ``write`` runs in ``workers`` forked processes.

    Formatting CSV holds Python's global lock, so in a thread it slows the main loop down; in
    processes it runs beside it. Each name always goes to the same process, so the parts of
    one table are written in order. Use :func:`make_sink`, which falls back to a thread where
    processes cannot be forked.
    """

    def __init__(self, write: Callable[[str, Any], None], workers: int = 2,
                 depth: int = 16) -> None:
        context = multiprocessing.get_context("fork")
        self._errors = context.Queue()
        self._jobs = [context.Queue(maxsize=depth) for _ in range(workers)]
        self._procs = [
            context.Process(target=_write_worker, args=(write, jobs, self._errors),
                            name=f"mapsim-writer-{k}", daemon=True)
            for k, jobs in enumerate(self._jobs)
        ]
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking a multi-threaded process (torch's thread pools);
            # the writers only run pandas, never torch, so the fork is safe here.
            warnings.simplefilter("ignore", DeprecationWarning)
            for proc in self._procs:
                proc.start()

    def _raise(self) -> None:
        try:
            message = self._errors.get_nowait()
        except queue.Empty:
            return
        raise OutputError(f"writing the results failed: {message}")

    def put(self, name: str, frame: Any) -> None:
        """Queue one table part for writing (blocks while that process's queue is full)."""
        self._raise()
        self._jobs[zlib.crc32(name.encode()) % len(self._jobs)].put((name, frame))

    def close(self) -> None:
        """Wait until everything queued is written; raise the first write error, if any."""
        for jobs in self._jobs:
            jobs.put(None)
        for proc in self._procs:
            proc.join()
        for jobs in self._jobs:
            jobs.close()
        self._raise()
        dead = [p.name for p in self._procs if p.exitcode != 0]
        if dead:
            raise OutputError(f"the results writer process {dead[0]} stopped unexpectedly")


def make_sink(write: Callable[[str, Any], None], n_items: int,
              min_items_for_processes: int = 8) -> BackgroundSink | ProcessSink:
    """Writer processes for runs of at least ``min_items_for_processes`` images where the
    platform can fork (Linux), otherwise one writer thread."""
    if n_items >= min_items_for_processes and "fork" in multiprocessing.get_all_start_methods():
        try:
            return ProcessSink(write)
        except OSError:
            pass
    return BackgroundSink(write)
