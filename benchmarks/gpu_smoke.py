"""Quick CUDA check: the engine on the GPU agrees with float64, and a first timing.

Run: ``python benchmarks/gpu_smoke.py [RESULTS.md]``. It prints Pearson's largest error against
float64 numpy on the CPU and on the GPU, and the time of one moments computation for CNN10's
640 maps at 1376 x 1104 against a plain FP32 Z Z^T of the same shape (TF32 off) measured in the
same run, then appends the figures with the command, machine and versions to the results file
(default: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from mapsim.engine.moments import compute_moments
from mapsim.plugins.metrics.pearson import Pearson


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return
    gen = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(64, 256 * 256, generator=gen) + 0.3) * 5 + 100
    ref = np.corrcoef(z.double().numpy())
    every = slice(0, 64)
    lines = []
    for device in ("cpu", "cuda"):
        m = compute_moments(z.to(device))
        r = Pearson(Pearson.Params(absolute=False)).from_moments(m, every, every).cpu().numpy()
        lines.append(f"{device}: 64 maps x 65536 px, max |r - float64| = "
                     f"{np.abs(r - ref).max():.2e}")
    big = torch.relu(torch.randn(640, 1376 * 1104, device="cuda"))
    for _ in range(2):
        compute_moments(big)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        compute_moments(big)
    torch.cuda.synchronize()
    moments_ms = (time.perf_counter() - t) / 5 * 1e3
    torch.backends.cuda.matmul.allow_tf32 = False
    for _ in range(2):
        big @ big.T
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        big @ big.T
    torch.cuda.synchronize()
    floor_ms = (time.perf_counter() - t) / 5 * 1e3
    lines.append(f"moments of 640 maps x 1376x1104 px: {moments_ms:.1f} ms; plain FP32 Z Z^T "
                 f"(TF32 off): {floor_ms:.1f} ms; ratio {moments_ms / floor_ms:.2f}")
    print("\n".join(lines))
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("RESULTS.md")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = [
        f"## gpu_smoke ({stamp})",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- machine: {torch.cuda.get_device_name()}, {platform.machine()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}",
        *(f"- {line}" for line in lines),
        "",
    ]
    with results.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(block) + "\n")


if __name__ == "__main__":
    main()
