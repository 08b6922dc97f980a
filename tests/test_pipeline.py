"""Read-ahead and write-behind threads keep order and hand errors back."""

from __future__ import annotations

import threading

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


def _append_line(name, job):
    path, text = job
    if text == "boom":
        raise OSError("no space left")
    with open(path, "a") as handle:
        handle.write(text + "\n")


def test_process_sink_writes_each_name_in_order_in_other_processes(tmp_path):
    from mapsim.core.pipeline import ProcessSink

    sink = ProcessSink(_append_line, workers=2, depth=2)
    for k in range(40):
        for name in ("a", "b", "c"):
            sink.put(name, (tmp_path / f"{name}.txt", f"{name}{k}"))
    sink.close()
    for name in ("a", "b", "c"):
        assert (tmp_path / f"{name}.txt").read_text().split() == [f"{name}{k}" for k in range(40)]


def test_process_sink_reports_a_failed_write(tmp_path):
    from mapsim.core.errors import OutputError
    from mapsim.core.pipeline import ProcessSink

    sink = ProcessSink(_append_line, workers=1)
    sink.put("a", (tmp_path / "a.txt", "fine"))
    sink.put("a", (tmp_path / "a.txt", "boom"))
    with pytest.raises(OutputError, match="no space left"):
        sink.close()
