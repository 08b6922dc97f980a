"""Overlap for a run: images read ahead in a thread, tables written behind in a thread or in
forked writer processes.

Both keep the order of their items and hand any exception back to the caller: a failure while
reading an image is raised where that image would have been returned, and a failure while
writing is raised at the next :meth:`BackgroundSink.put` or at :meth:`BackgroundSink.close`.
Queues are bounded, so memory stays flat however many images a run has.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from mapsim.core.errors import OutputError

_DONE = object()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) copied to ``device``.

    To a GPU it goes through pinned memory without waiting: a copy from ordinary (pageable)
    memory first waits until the device has finished all the work queued before it, which
    would stop the host from preparing the next image while the device computes this one.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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


def _format_worker(format_part: Callable[[str, Any], tuple[Any, bytes]], jobs: Any,
                   done: Any) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        seq, name, payload = job
        try:
            target, data = format_part(name, payload)
        except BaseException as exc:  # reported to the parent, which raises it
            done.put((seq, None, f"{type(exc).__name__}: {exc}"))
        else:
            done.put((seq, target, data))


def default_workers() -> int:
    """Formatting processes for a run: half the usable cores, at least 2, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(2, min(8, cores // 2))


class ProcessSink:
    """Like :class:`BackgroundSink`, but the parts are formatted in forked processes.

    ``format_part(name, job) -> (target, data)`` runs in any of ``workers`` processes, so
    many parts are formatted at once (formatting CSV holds Python's global lock, so threads
    would not help); ``append(target, data)`` then runs in one thread of this process, in the
    order the parts were queued, so every table is written in order. At most ``depth`` parts
    are in flight, which bounds memory. Use :func:`make_sink`, which falls back to a thread
    where processes cannot be forked.
    """

    def __init__(self, format_part: Callable[[str, Any], tuple[Any, bytes]],
                 append: Callable[[Any, bytes], None], workers: int | None = None,
                 depth: int | None = None) -> None:
        workers = workers or default_workers()
        context = multiprocessing.get_context("fork")
        self._append = append
        self._jobs = context.Queue()
        self._done = context.Queue()
        self._slots = threading.Semaphore(depth or 4 * workers)
        self._seq = 0
        self._error: str | None = None
        self._procs = [
            context.Process(target=_format_worker, args=(format_part, self._jobs, self._done),
                            name=f"mapsim-writer-{k}", daemon=True)
            for k in range(workers)
        ]
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking a multi-threaded process (torch's thread pools);
            # the writers only run pandas, never torch, so the fork is safe here.
            warnings.simplefilter("ignore", DeprecationWarning)
            for proc in self._procs:
                proc.start()
        self._collector = threading.Thread(target=self._collect, name="mapsim-writer",
                                           daemon=True)
        self._collector.start()

    def _collect(self) -> None:
        waiting: dict[int, tuple[Any, Any]] = {}
        expected = 0
        while True:
            seq, target, data = self._done.get()
            if seq is None:
                if waiting and self._error is None:
                    self._error = "a results writer process stopped unexpectedly"
                return
            waiting[seq] = (target, data)
            while expected in waiting:
                target, data = waiting.pop(expected)
                expected += 1
                self._slots.release()
                if self._error is not None:
                    continue  # after a failure nothing more is written
                if target is None:
                    self._error = data
                    continue
                try:
                    self._append(target, data)
                except BaseException as exc:  # raised in the caller's thread
                    self._error = f"{type(exc).__name__}: {exc}"

    def _raise(self) -> None:
        if self._error is not None:
            raise OutputError(f"writing the results failed: {self._error}")

    def put(self, name: str, job: Any) -> None:
        """Queue one table part (blocks while ``depth`` parts are in flight)."""
        self._raise()
        while not self._slots.acquire(timeout=1.0):
            self._raise()
            dead = [p.name for p in self._procs if not p.is_alive()]
            if dead:
                raise OutputError(f"the results writer process {dead[0]} stopped unexpectedly")
        self._jobs.put((self._seq, name, job))
        self._seq += 1

    def close(self) -> None:
        """Wait until everything queued is written; raise the first error, if any."""
        for _ in self._procs:
            self._jobs.put(None)
        for proc in self._procs:
            proc.join()
        self._done.put((None, None, None))  # after every result: the workers have exited
        self._collector.join()
        for queue_ in (self._jobs, self._done):
            queue_.close()
        self._raise()
        dead = [p.name for p in self._procs if p.exitcode != 0]
        if dead:
            raise OutputError(f"the results writer process {dead[0]} stopped unexpectedly")


def make_sink(format_part: Callable[[str, Any], tuple[Any, bytes]],
              append: Callable[[Any, bytes], None], n_items: int,
              min_items_for_processes: int = 8) -> BackgroundSink | ProcessSink:
    """Formatting processes for runs of at least ``min_items_for_processes`` images where the
    platform can fork (Linux), otherwise one writer thread; both write the same bytes."""
    if n_items >= min_items_for_processes and "fork" in multiprocessing.get_all_start_methods():
        try:
            return ProcessSink(format_part, append)
        except OSError:
            pass
    return BackgroundSink(lambda name, job: append(*format_part(name, job)))
