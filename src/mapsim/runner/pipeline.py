"""Overlap for a run: images read ahead in a thread; tables built and written behind, in
forked worker processes (or a thread).

Both keep the order of their items and hand any exception back to the caller: a failure while
reading an image is raised where that image would have been returned, and a failure while
building or writing tables is raised at the next ``put`` or at ``close`` of the sink.
Queues are bounded, so memory stays flat however many images a run has.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any


from mapsim.devices import to_device  # noqa: F401 (re-exported for the tests)
from mapsim.errors import OutputError
from mapsim.runner.lifetime import die_with_parent

_DONE = object()
_STARTED = "started"


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Yield ``items`` in order, producing up to ``depth`` ahead in a background thread.

    The thread starts on an item only when there is room for it, so at most ``depth`` items
    wait beside the one the consumer holds (a queue that is merely bounded would hold one more,
    the item its producer waits to put: a 6 MB image per step for a 1104 x 1376 run).
    """
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue()
    room = threading.Semaphore(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            source = iter(items)
            while True:
                while not room.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(source, _DONE)
                ready.put((True, item))
                if item is _DONE:
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put((False, exc))

    thread = threading.Thread(target=produce, name="mapsim-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            room.release()
            yield item
    finally:
        stop.set()
        thread.join()


class _ErrorKeeper:
    """The first error of a sink's background work, kept until the caller's thread raises it."""

    _error: BaseException | None = None

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class BackgroundSink(_ErrorKeeper):
    """Runs ``deliver(work(job))`` for each :meth:`put`, in order, in one background thread."""

    def __init__(self, work: Callable[[Any], Any], deliver: Callable[[Any], None],
                 depth: int = 64) -> None:
        self._work = work
        self._deliver = deliver
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
                    self._deliver(self._work(job))
                except BaseException as exc:  # raised in the caller's thread
                    self._error = exc

    def put(self, job: Any) -> None:
        """Queue one job (blocks while the queue is full)."""
        self._raise()
        self._queue.put(job)

    def close(self) -> None:
        """Wait until every job is done; raise the first error, if any."""
        self._queue.put(_DONE)
        self._thread.join()
        self._raise()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (to be raised in the parent as it is), else an
    :class:`OutputError` with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to pickle
        return OutputError(f"writing the results failed: {type(exc).__name__}: {exc}")


def _worker(work: Callable[[Any], Any], jobs: Any, done: Any, parent: int) -> None:
    die_with_parent(parent)
    while True:
        job = jobs.get()
        if job is None:
            return
        seq, payload = job
        done.put((seq, _STARTED, None))  # the parent may queue another job
        try:
            result = work(payload)
        except BaseException as exc:  # handed to the parent, which raises it
            done.put((seq, False, _portable(exc)))
        else:
            done.put((seq, True, result))


def default_workers() -> int:
    """Worker processes for a run: half the usable cores, at least 2, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(2, min(8, cores // 2))


class ProcessSink(_ErrorKeeper):
    """Like :class:`BackgroundSink`, but ``work`` runs in forked processes.

    ``work(job)`` runs in any of ``workers`` processes, so many jobs run at once (building
    and formatting tables holds Python's global lock, so threads would not help); the
    processes are forked, so ``work`` and what it refers to are inherited, never pickled
    (jobs and results are). ``deliver(result)`` then runs in one thread of this process, in
    the order the jobs were queued, so every table is written in order. At most ``depth``
    jobs wait for a worker: that bounds the memory jobs hold here (a job can be a similarity
    matrix of several MB), while a slow job never holds the others back. Use
    :func:`make_sink`, which falls back to a thread where processes cannot be forked.
    """

    def __init__(self, work: Callable[[Any], Any], deliver: Callable[[Any], None],
                 workers: int | None = None, depth: int | None = None) -> None:
        workers = workers or default_workers()
        context = multiprocessing.get_context("fork")
        self._deliver = deliver
        self._jobs = context.Queue()
        self._done = context.Queue()
        self._slots = threading.Semaphore(depth or 4)
        self._seq = 0
        self._error: BaseException | None = None
        self._procs = [
            context.Process(target=_worker, args=(work, self._jobs, self._done, os.getpid()),
                            name=f"mapsim-writer-{k}", daemon=True)
            for k in range(workers)
        ]
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking a multi-threaded process (torch's thread pools);
            # the workers only build and format tables, never run torch, so the fork is safe.
            warnings.simplefilter("ignore", DeprecationWarning)
            for proc in self._procs:
                proc.start()
        self._collector = threading.Thread(target=self._collect, name="mapsim-writer",
                                           daemon=True)
        self._collector.start()

    def _collect(self) -> None:
        waiting: dict[int, tuple[bool, Any]] = {}
        expected = 0
        while True:
            seq, ok, result = self._done.get()
            if ok == _STARTED:  # (pickled: equal, not the same object)
                self._slots.release()
                continue
            if seq is None:
                if waiting and self._error is None:
                    self._error = OutputError("a results writer process stopped unexpectedly")
                return
            waiting[seq] = (ok, result)
            while expected in waiting:
                ok, result = waiting.pop(expected)
                expected += 1
                if self._error is not None:
                    continue  # after a failure nothing more is written
                if not ok:
                    self._error = result
                    continue
                try:
                    self._deliver(result)
                except BaseException as exc:  # raised in the caller's thread
                    self._error = exc

    def put(self, job: Any) -> None:
        """Queue one job (blocks while ``depth`` jobs wait for a worker)."""
        self._raise()
        while not self._slots.acquire(timeout=1.0):
            self._raise()
            dead = [p.name for p in self._procs if not p.is_alive()]
            if dead:
                raise OutputError(f"the results writer process {dead[0]} stopped unexpectedly")
        # the number is taken before the job is queued: an interrupt between the two can then
        # leave a gap (the later results wait, and their block is not kept), never two jobs
        # with one number (one result would be dropped and its block kept without it)
        seq, self._seq = self._seq, self._seq + 1
        self._jobs.put((seq, job))

    def close(self) -> None:
        """Wait until every job is done and delivered; raise the first error, if any."""
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


def make_sink(work: Callable[[Any], Any], deliver: Callable[[Any], None], n_items: int,
              min_items_for_processes: int = 8) -> BackgroundSink | ProcessSink:
    """Worker processes for runs of at least ``min_items_for_processes`` images where the
    platform can fork (Linux), otherwise one thread; both deliver the same results in the
    same order."""
    if n_items >= min_items_for_processes and "fork" in multiprocessing.get_all_start_methods():
        try:
            return ProcessSink(work, deliver)
        except OSError:
            pass
    return BackgroundSink(work, deliver)
