"""Fault injection: two runs into one folder, kills at several points, --overwrite on folders
that are not results, a full disk and unusable output paths. Each case checks the exit
status, the message (no traceback), the state of the target and partial folders, and that no
process is left behind. (Hostile spec files: tests/test_spec_documents.py.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mapsim.cli import main
from mapsim.runner import writer
from mapsim.runner.lock import RunLock

ROOT = Path(__file__).resolve().parents[1]


def _spec(folder: Path, count: int = 4, size: int = 48, out: str = "out") -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "faults",
        "models": {"m": {"architecture": {"name": "fcn", "depth": 2, "width": 6}, "seed": 1}},
        "layers": {"m": ["blocks.0", "blocks.1"]},
        "images": {"name": "synthetic-vessels", "count": count, "size": [size, size],
                   "seed": 5},
        "comparisons": [["m", "m"]],
        "engine": {"block_images": 2},
        "output": {"dir": out},
    }))
    return path


def _mapsim(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapsim", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def _no_traceback(done: subprocess.CompletedProcess) -> str:
    text = done.stdout + done.stderr
    assert "Traceback" not in text, text
    return text


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


# --------------------------------------------------------------------------- one writer
def test_a_second_run_into_a_locked_folder_fails_at_once_naming_the_first(tmp_path):
    spec = _spec(tmp_path)
    target = (tmp_path / "out").resolve()
    with RunLock(target):
        done = _mapsim("run", str(spec), "--quiet")
    text = _no_traceback(done)
    assert done.returncode == 2
    assert f"another mapsim run is writing {target} (PID {os.getpid()}" in text
    assert "started 20" in text  # the start time of the run that holds the lock
    assert not target.exists() and not (tmp_path / ".out.partial").exists()
    assert not (tmp_path / ".out.lock").exists()  # released and removed


def test_the_lock_is_released_by_the_kernel_when_its_holder_is_killed(tmp_path):
    target = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from mapsim.runner.lock import RunLock; "
        f"RunLock({str(target)!r}).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match=f"PID {holder.pid}"):
            RunLock(target).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(target) as lock:  # the killed holder's lock is gone; its file is reused
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_two_runs_started_together_give_one_complete_result(tmp_path):
    spec = _spec(tmp_path, count=6)
    runs = [subprocess.Popen([sys.executable, "-m", "mapsim", "run", str(spec), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in runs]
    codes = sorted(code for code, _, _ in results)
    for _, out, err in results:
        assert "Traceback" not in out + err
    # either one waited behind the other's lock and found the folder taken, or they ran one
    # after the other: never two writers, never a mixed table
    assert codes[0] == 0 and codes[1] in (0, 2)
    max_csv = (tmp_path / "out" / "max.csv").read_text().splitlines()
    assert len(max_csv) == 1 + 6 * 2 * (6 + 6)  # header + images x layer pairs x maps
    assert not (tmp_path / ".out.partial").exists()


# --------------------------------------------------------------------------- kills
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_run_leaves_no_process_and_can_resume(tmp_path, sig):
    spec = _spec(tmp_path, count=200, size=128)
    run = subprocess.Popen([sys.executable, "-m", "mapsim", "run", str(spec), "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    second_block = tmp_path / ".out.partial" / "blocks" / "000001"
    while time.monotonic() < deadline and run.poll() is None and not (
            len(workers) >= 2 and second_block.exists()):
        workers = _children(run.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the run never started its table workers"
    assert run.poll() is None, "the run ended before it could be killed"
    run.send_signal(sig)  # two blocks in, many to go
    code = run.wait(timeout=60)
    out, err = run.communicate()
    assert code != 0
    assert "Traceback" not in out + err
    if sig == signal.SIGINT:
        assert "interrupted" in err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "worker processes outlived the run"
    assert not (tmp_path / "out").exists()  # nothing published
    resumed = _mapsim("run", str(spec), "--quiet", "--resume")
    _no_traceback(resumed)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "out" / "summary.csv").is_file()


def test_the_error_that_stops_a_run_is_the_one_reported(tmp_path, monkeypatch):
    """An interrupt (here: a failing image) can cut a table job short, and closing the table
    workers then reports that too: the error that stopped the run must stay the one raised,
    and the finished blocks are kept for --resume."""
    from mapsim.engine.step import ImageStep
    from mapsim.errors import ImageError, OutputError
    from mapsim.runner.pipeline import ProcessSink
    from mapsim.runner.run import run
    from mapsim.spec.run_spec import load_spec

    launch, close = ImageStep.launch, ProcessSink.close

    def fails_at_the_fifth(self, item, index=None):
        if index == 4:
            raise ImageError("image 4 could not be read")
        return launch(self, item, index)

    def close_reports(self):
        close(self)
        raise OutputError("a results writer process stopped unexpectedly")

    monkeypatch.setattr(ProcessSink, "close", close_reports)
    monkeypatch.setattr(ImageStep, "launch", fails_at_the_fifth)
    spec = load_spec(_spec(tmp_path, count=10))
    with pytest.raises(ImageError, match="image 4 could not be read"):
        run(spec, base_dir=tmp_path, progress=False)
    kept = sorted(p.name for p in (tmp_path / ".out.partial" / "blocks").iterdir())
    assert kept[:2] == ["000000", "000001"], kept


# --------------------------------------------------------------------------- --overwrite
def test_overwrite_refuses_a_folder_that_is_not_results(tmp_path):
    spec = _spec(tmp_path)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("\\chapter{One}\n")
    done = _mapsim("run", str(spec), "--out", str(thesis), "--overwrite", "--quiet")
    text = _no_traceback(done)
    assert done.returncode == 2
    assert "only replaces mapsim results" in text and "chapter1.tex" in text
    assert (thesis / "chapter1.tex").read_text() == "\\chapter{One}\n"
    assert sorted(p.name for p in thesis.iterdir()) == ["chapter1.tex"]


def test_overwrite_never_deletes_the_inputs_of_the_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    spec = _spec(data)  # the spec lives in the folder it would overwrite
    (data / "run.json").write_text('{"mapsim_version": "0.1.0"}')  # even if it looks like results
    done = _mapsim("run", str(spec), "--out", str(data), "--overwrite", "--quiet")
    text = _no_traceback(done)
    assert done.returncode == 2 and "an input of this run" in text
    assert spec.is_file()


def test_overwrite_replaces_earlier_results(tmp_path):
    spec = _spec(tmp_path)
    assert _mapsim("run", str(spec), "--quiet").returncode == 0
    again = _mapsim("run", str(spec), "--quiet", "--overwrite")
    assert again.returncode == 0, again.stderr


# --------------------------------------------------------------------------- disk and paths
def test_a_full_disk_is_a_message_and_keeps_old_results_and_finished_blocks(
        tmp_path, monkeypatch, capsys):
    spec = _spec(tmp_path, count=6)
    assert main(["run", str(spec), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    calls = []
    real_open = open

    def filling(path, mode="r", *args, **kwargs):
        if "a" in mode and ".out.partial" in str(path):
            calls.append(path)
            if len(calls) > 12:  # the disk fills up part way through the rows
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(writer, "open", filling, raising=False)
    code = main(["run", str(spec), "--quiet", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no space left on the device" in err and "bytes" in err and "--resume" in err
    assert "Traceback" not in err
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert after == before  # the earlier results are untouched
    assert (tmp_path / ".out.partial" / "progress.json").is_file()
    monkeypatch.undo()
    assert main(["run", str(spec), "--quiet", "--resume", "--overwrite"]) == 0


@pytest.mark.parametrize("out", ["/", "spec.yaml"])
def test_unusable_output_paths_are_messages(tmp_path, out):
    spec = _spec(tmp_path)
    done = _mapsim("run", str(spec), "--out", out, "--quiet", cwd=tmp_path)
    text = _no_traceback(done)
    assert done.returncode == 2
    assert ("folder of their own" in text) if out == "/" else ("not a directory" in text)
    assert spec.is_file()


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    found, frontier = [], [pid]
    while frontier:
        children = _children(frontier.pop())
        found += children
        frontier += children
    return found


def test_a_run_killed_while_it_starts_leaves_nothing_behind(tmp_path):
    spec = _spec(tmp_path, count=40, size=96)
    run = subprocess.Popen([sys.executable, "-m", "mapsim", "run", str(spec), "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # still importing or building its models
    below = _descendants(run.pid)
    run.kill()
    run.wait(timeout=60)
    run.communicate()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in below):
        time.sleep(0.1)
    assert not [p for p in below if _alive(p)]
    assert not (tmp_path / "out").exists()
    again = _mapsim("run", str(spec), "--quiet")
    assert again.returncode == 0, again.stderr  # no stale lock, a fresh start
    assert (tmp_path / "out" / "max.csv").is_file()


def test_killing_torchrun_ends_its_ranks_and_their_workers(tmp_path):
    torch_distributed = pytest.importorskip("torch.distributed")
    if not torch_distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    spec = _spec(tmp_path, count=200, size=128)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "mapsim", "run", str(spec), "--quiet"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_block = tmp_path / ".out.partial" / "blocks" / "000000"
    deadline = time.monotonic() + 180
    below: list[int] = []
    while time.monotonic() < deadline and launcher.poll() is None and not first_block.exists():
        time.sleep(0.1)
    below = _descendants(launcher.pid)
    assert launcher.poll() is None and len(below) >= 2, "torchrun never got its ranks going"
    launcher.kill()  # SIGKILL: the launcher cannot pass anything on
    launcher.wait(timeout=60)
    launcher.communicate()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in below):
        time.sleep(0.2)
    assert not [p for p in below if _alive(p)], "ranks or their workers outlived torchrun"
