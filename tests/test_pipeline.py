"""Read-ahead and write-behind threads keep order and hand errors back."""

from __future__ import annotations

import os
import threading
import time

import pytest

from mapsim.core.pipeline import BackgroundSink, prefetch


def test_prefetch_keeps_order_and_reads_ahead_in_another_thread():
    threads = []

    def items():
        for k in range(20):
            threads.append(threading.current_thread().name)
            yield k

    assert list(prefetch(items(), depth=3)) == list(range(20))
    assert set(threads) == {"mapsim-prefetch"}
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))


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
    produced = []

    def items():
        for k in range(1000):
            produced.append(k)
            yield k

    for item in prefetch(items(), depth=2):
        if item == 3:
            break
    assert len(produced) < 10
    assert not any(t.name == "mapsim-prefetch" for t in threading.enumerate())


def test_background_sink_writes_in_order_and_reports_errors():
    written = []
    sink = BackgroundSink(lambda name, frame: written.append((name, frame)), depth=2)
    for k in range(50):
        sink.put("t", k)
    sink.close()
    assert written == [("t", k) for k in range(50)]

    def failing(name, frame):
        if frame == 2:
            raise OSError("disk full")
        written.append(frame)

    written.clear()
    sink = BackgroundSink(failing)
    with pytest.raises(OSError, match="disk full"):
        for k in range(5):
            sink.put("t", k)
        sink.close()
    assert written[:2] == [0, 1] and 3 not in written


def _format_line(name, job):
    path, text = job
    if text == "boom":
        raise OSError("no space left")
    return path, (text + "\n").encode()


def _append(path, data):
    with open(path, "ab") as handle:
        handle.write(data)


def test_process_sink_writes_each_name_in_order_in_other_processes(tmp_path):
    from mapsim.core.pipeline import ProcessSink

    sink = ProcessSink(_format_line, _append, workers=2, depth=2)
    for k in range(40):
        for name in ("a", "b", "c"):
            sink.put(name, (tmp_path / f"{name}.txt", f"{name}{k}"))
    sink.close()
    for name in ("a", "b", "c"):
        assert (tmp_path / f"{name}.txt").read_text().split() == [f"{name}{k}" for k in range(40)]


def test_process_sink_reports_a_failed_write(tmp_path):
    from mapsim.core.errors import OutputError
    from mapsim.core.pipeline import ProcessSink

    sink = ProcessSink(_format_line, _append, workers=1)
    sink.put("a", (tmp_path / "a.txt", "fine"))
    sink.put("a", (tmp_path / "a.txt", "boom"))
    with pytest.raises(OutputError, match="no space left"):
        sink.close()


def _format_slowly(name, job):
    path, text = job
    if text.endswith("0"):  # some parts finish long after the ones queued behind them
        time.sleep(0.05)
    if text == "die":
        os._exit(3)
    return path, (text + "\n").encode()


def test_process_sink_writes_parts_in_queue_order_when_formatted_out_of_order(tmp_path):
    from mapsim.core.pipeline import ProcessSink

    sink = ProcessSink(_format_slowly, _append, workers=3, depth=6)
    for k in range(30):
        sink.put("t", (tmp_path / "t.txt", f"{k}"))
    sink.close()
    assert (tmp_path / "t.txt").read_text().split() == [str(k) for k in range(30)]


def test_process_sink_reports_a_writer_process_that_died(tmp_path):
    from mapsim.core.errors import OutputError
    from mapsim.core.pipeline import ProcessSink

    sink = ProcessSink(_format_slowly, _append, workers=1, depth=1)
    with pytest.raises(OutputError, match="stopped unexpectedly"):
        sink.put("t", (tmp_path / "t.txt", "die"))
        for k in range(3):  # the full queue notices the dead process
            sink.put("t", (tmp_path / "t.txt", f"{k}"))
        sink.close()
    assert not (tmp_path / "t.txt").exists()
