"""Overlap for a run: images read ahead in a thread, tables written behind in a thread.

Both keep the order of their items and hand any exception back to the caller: a failure while
reading an image is raised where that image would have been returned, and a failure while
writing is raised at the next :meth:`BackgroundSink.put` or at :meth:`BackgroundSink.close`.
Queues are bounded, so memory stays flat however many images a run has.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
