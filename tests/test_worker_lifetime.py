"""A run that fails or is interrupted leaves no worker process behind, also with minibatch
CKA over whole layer outputs (whose batches are held while the table workers run)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from test_faults import _alive, _children


def _spec(folder: Path, paths: list[str]) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "workers",
        "models": {"m": {"architecture": {"name": "fcn", "depth": 2, "width": 6}, "seed": 1}},
        "layers": {"m": ["blocks.0", "blocks.1"]},
        "images": {"name": "files", "paths": paths},
        "comparisons": [["m", "m"]],
        "metrics": ["pearson", {"name": "cka", "samples": "images", "pool": "none",
                                "batch_size": 4}],
        "engine": {"block_images": 4},
        "output": {"dir": "out"},
    }))
    return path


def _images(folder: Path, count: int, size: int, broken: int | None = None) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        path = folder / f"img-{k:03d}.png"
        if k == broken:
            path.write_bytes(b"\x89PNG not really")
        else:
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _watch(run: subprocess.Popen, until: float) -> list[int]:
    """The run's child processes, seen until it ends or ``until``."""
    seen: set[int] = set()
    while time.monotonic() < until and run.poll() is None:
        seen.update(_children(run.pid))
        time.sleep(0.05)
    return sorted(seen)


def _none_left(workers: list[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "worker processes outlived the run"


def test_a_failing_run_ends_and_leaves_no_worker(tmp_path):
    spec = _spec(tmp_path, _images(tmp_path, 24, 48, broken=14))
    run = subprocess.Popen([sys.executable, "-m", "mapsim", "run", str(spec), "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=tmp_path)
    workers = _watch(run, time.monotonic() + 240)
    code = run.wait(timeout=60)
    _, err = run.communicate()
    assert code != 0 and "img-014" in err, err
    assert "Traceback" not in err
    assert len(workers) >= 2, "the run never started its table workers"
    _none_left(workers)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_run_leaves_no_worker(tmp_path, sig):
    spec = _spec(tmp_path, _images(tmp_path, 400, 96))
    run = subprocess.Popen([sys.executable, "-m", "mapsim", "run", str(spec), "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=tmp_path)
    second_block = tmp_path / ".out.partial" / "blocks" / "000001"
    deadline = time.monotonic() + 180
    workers: list[int] = []
    while time.monotonic() < deadline and run.poll() is None and not (
            len(workers) >= 2 and second_block.exists()):
        workers = sorted(set(workers) | set(_children(run.pid)))
        time.sleep(0.05)
    assert len(workers) >= 2, "the run never started its table workers"
    assert run.poll() is None, "the run ended before it could be interrupted"
    run.send_signal(sig)
    code = run.wait(timeout=60)
    _, err = run.communicate()
    assert code != 0 and "Traceback" not in err, err
    _none_left(workers)
