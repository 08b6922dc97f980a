"""Read-ahead and write-behind threads keep order and hand errors back."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from mapsim.runner.pipeline import BackgroundSink, prefetch, to_device


def test_prefetch_keeps_order_and_reads_ahead_in_another_thread():
    threads = []

    def items():
        for k in range(20):
            threads.append(threading.current_thread().name)
            yield k

    assert list(prefetch(items(), depth=3)) == list(range(20))
    assert set(threads) == {"mapsim-prefetch"}
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))


def _recorded(n: int) -> tuple[list[int], Iterator[int]]:
    """0..n-1 as a generator, and the list of the items it has produced so far."""
    produced: list[int] = []

    def items() -> Iterator[int]:
        for k in range(n):
            produced.append(k)
            yield k

    return produced, items()


def test_prefetch_reads_no_more_than_depth_items_beyond_the_one_in_hand():
    produced, items = _recorded(10)
    stream = prefetch(items, depth=2)
    assert next(stream) == 0
    time.sleep(0.3)  # ample time for the thread to read everything it may
    assert produced == [0, 1, 2]  # item 0 in hand, 1 and 2 waiting: no item 3 read yet
    assert next(stream) == 1
    time.sleep(0.3)
    assert produced == [0, 1, 2, 3]
    stream.close()


def test_prefetch_raises_where_the_failing_item_would_be():
    def items():
        yield 1
        yield 2
        raise ValueError("image 3 is unreadable")

    got = []
    with pytest.raises(ValueError, match="image 3"):
        for item in prefetch(items(), depth=2):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    produced, items = _recorded(1000)
    for item in prefetch(items, depth=2):
        if item == 3:
            break
    assert len(produced) < 10
    assert not any(t.name == "mapsim-prefetch" for t in threading.enumerate())


def test_background_sink_writes_in_order_and_reports_errors():
    written = []
    sink = BackgroundSink(lambda job: job * 10, written.append, depth=2)
    for k in range(50):
        sink.put(k)
    sink.close()
    assert written == [10 * k for k in range(50)]

    def failing(job):
        if job == 2:
            raise OSError("disk full")
        return job

    written.clear()
    sink = BackgroundSink(failing, written.append)
    with pytest.raises(OSError, match="disk full"):
        for k in range(5):
            sink.put(k)
        sink.close()
    assert written[:2] == [0, 1] and 3 not in written


def _line(job):
    path, text = job
    if text.endswith("0"):  # some jobs finish long after the ones queued behind them
        time.sleep(0.05)
    if text == "boom":
        raise OSError("no space left")
    if text == "die":
        os._exit(3)
    return path, (text + "\n").encode()


def _append(result):
    path, data = result
    with open(path, "ab") as handle:
        handle.write(data)


def test_process_sink_delivers_in_queue_order_when_jobs_finish_out_of_order(tmp_path):
    from mapsim.runner.pipeline import ProcessSink

    sink = ProcessSink(_line, _append, workers=3, depth=6)
    for k in range(40):
        for name in ("a", "b", "c"):
            sink.put((tmp_path / f"{name}.txt", f"{name}{k}"))
    sink.close()
    for name in ("a", "b", "c"):
        assert (tmp_path / f"{name}.txt").read_text().split() == [f"{name}{k}" for k in range(40)]


def test_an_interrupt_just_after_a_job_is_queued_loses_no_later_job(tmp_path):
    """An interrupt that lands after a job went into the queue, before the sink counted it:
    the next job must not take the same number (one of the two results would be dropped)."""
    from mapsim.runner.pipeline import ProcessSink

    sink = ProcessSink(_line, _append, workers=2)
    queue_put = sink._jobs.put
    interrupted = []

    def put_then_interrupt(job):
        queue_put(job)
        if not interrupted:
            interrupted.append(job)
            raise KeyboardInterrupt

    sink._jobs.put = put_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        sink.put((tmp_path / "a.txt", "first"))
    sink.put((tmp_path / "a.txt", "second"))
    sink.close()
    assert (tmp_path / "a.txt").read_text().split() == ["first", "second"]


def test_process_sink_raises_the_error_of_a_job_and_writes_nothing_after_it(tmp_path):
    from mapsim.runner.pipeline import ProcessSink

    sink = ProcessSink(_line, _append, workers=2)
    sink.put((tmp_path / "a.txt", "fine"))
    sink.put((tmp_path / "a.txt", "boom"))
    sink.put((tmp_path / "a.txt", "late"))
    with pytest.raises(OSError, match="no space left"):
        sink.close()
    assert (tmp_path / "a.txt").read_text().split() == ["fine"]


class _Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def _unpicklable(job):
    raise _Unpicklable(1, 2)


def test_process_sink_reports_an_error_that_cannot_be_pickled(tmp_path):
    from mapsim.errors import OutputError
    from mapsim.runner.pipeline import ProcessSink

    sink = ProcessSink(_unpicklable, _append, workers=1)
    sink.put("x")
    with pytest.raises(OutputError, match="_Unpicklable: 1 and 2"):
        sink.close()


def test_process_sink_reports_a_worker_process_that_died(tmp_path):
    from mapsim.errors import OutputError
    from mapsim.runner.pipeline import ProcessSink

    sink = ProcessSink(_line, _append, workers=1, depth=1)
    with pytest.raises(OutputError, match="stopped unexpectedly"):
        sink.put((tmp_path / "t.txt", "die"))
        for k in range(3):  # the full queue notices the dead process
            sink.put((tmp_path / "t.txt", f"{k}"))
        sink.close()
    assert not (tmp_path / "t.txt").exists()


def test_to_device_on_the_cpu_gives_the_same_values():
    host = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(to_device(host, torch.device("cpu")), host)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_device_does_not_wait_for_queued_work_and_pins_no_host_copy():
    device = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=device)
    host = torch.randn(1104, 1376, dtype=torch.float32)  # a 6 MB image
    to_device(host, device)  # first call: the copy stream is created
    torch.cuda.synchronize()
    pinned = torch.cuda.memory.host_memory_stats().get("allocated_bytes.current", 0)
    for _ in range(40):  # about a second of queued work on the current stream
        busy = busy @ busy
        busy /= busy.norm()
    queued = torch.cuda.Event()
    queued.record()
    copied = to_device(host, device)
    assert not queued.query()  # returned while that work was still running
    total = copied.double().sum()  # on the current stream: ordered after the copy
    assert torch.cuda.memory.host_memory_stats().get("allocated_bytes.current", 0) == pinned
    assert total.item() == pytest.approx(host.double().sum().item(), rel=1e-12, abs=1e-9)
