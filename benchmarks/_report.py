"""Shared by the benchmarks: machine and versions, and appending a block to RESULTS.md."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine(device: str) -> str:
    """The device and the host, in words."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = f"{cpu}, {cores} cores usable, torch threads {torch.get_num_threads()}"
    if hasattr(os, "getloadavg"):
        host += f", load average {os.getloadavg()[0]:.1f} at the end"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (host: {host})"
    return host


def versions() -> str:
    import mapsim

    return (f"mapsim {mapsim.__version__}, python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {np.__version__}")


def append(title: str, device: str, lines: list[str], results: Path | None = None) -> None:
    """Print ``lines`` last and append them with the command, machine and versions."""
    print("\n".join(lines))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = [
        f"## {title} ({stamp})",
        f"- command: `python {shlex.join(sys.argv)}`",
        f"- machine: {machine(device)}",
        f"- versions: {versions()}",
        *(f"- {line}" for line in lines),
        "",
    ]
    path = results or RESULTS
    with path.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(block) + "\n")
    print(f"(appended to {path})")


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic smooth random image in [0, 1] (speed does not depend on content)."""
    rng = np.random.default_rng(seed)
    small = rng.random((height // 8 + 2, width // 8 + 2))
    image = np.kron(small, np.ones((8, 8)))[:height, :width]
    image += 0.1 * rng.random((height, width))
    return (image - image.min()) / (image.max() - image.min())
