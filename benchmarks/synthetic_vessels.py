"""Time the synthetic-vessels generator at 256 x 256 and at the study's 1104 x 1376.

Run: ``python benchmarks/synthetic_vessels.py [RESULTS.md]``. For each size it generates a
few images (each seed once, after one warm-up image) and prints the median and the largest
wall-clock time of one image (geometry, label and rendering), its CPU time (which other
processes on a busy machine inflate less), the same for the label alone, and the range of
vessel fractions, then appends the figures with the command, machine and versions to the
results file (default: benchmarks/RESULTS.md). Targets: well under 0.2 s at 256 x 256, about 1 s at
1104 x 1376 on a 2-core CPU.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import scipy

from mapsim.plugins.vessels import generate


def _times(size: tuple[int, int], seeds: range, image: bool) -> tuple[list, list, list]:
    """Wall-clock and CPU (process) seconds per image, and the vessel fractions."""
    generate(1000, 0, size, image=image)  # warm-up (imports, caches)
    wall, cpu, fractions = [], [], []
    for seed in seeds:
        start, start_cpu = time.perf_counter(), time.process_time()
        sample = generate(seed, 0, size, image=image)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        fractions.append(float(sample.label.mean()))
    return wall, cpu, fractions


def main() -> None:
    lines = []
    for size, seeds in (((256, 256), range(20)), ((1104, 1376), range(5))):
        wall, cpu, fractions = _times(size, seeds, image=True)
        label, label_cpu, _ = _times(size, seeds, image=False)
        lines.append(
            f"{size[0]}x{size[1]}: {len(wall)} images; one image: median {np.median(wall):.3f} s "
            f"wall (max {max(wall):.3f} s), {np.median(cpu):.3f} s CPU; label only: median "
            f"{np.median(label):.3f} s wall, {np.median(label_cpu):.3f} s CPU; vessel fraction "
            f"{min(fractions):.3f}-{max(fractions):.3f}"
        )
    for line in lines:
        print(line)
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("RESULTS.md")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", load average %.1f" % os.getloadavg()[0]
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores{load}"
    block = [
        f"\n## synthetic_vessels ({stamp})",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- machine: {machine}",
        f"- versions: python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}",
        *[f"- {line}" for line in lines],
    ]
    with open(target, "a", encoding="utf-8") as fh:
        fh.write("\n".join(block) + "\n")
    print(f"appended to {target}")


if __name__ == "__main__":
    main()
