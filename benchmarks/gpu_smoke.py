"""Quick CUDA check: the engine on the GPU agrees with float64 and with the CPU path.

Run: python benchmarks/gpu_smoke.py   (prints timings of one 640-map moments product)
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mapsim.core.moments import compute_moments
from mapsim.core.pearson import Pearson


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return
    gen = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(64, 256 * 256, generator=gen) + 0.3) * 5 + 100
    ref = np.corrcoef(z.double().numpy())
    every = slice(0, 64)
    for device in ("cpu", "cuda"):
        m = compute_moments(z.to(device))
        r = Pearson(Pearson.Params(absolute=False)).from_moments(m, every, every).cpu().numpy()
        print(f"{device}: max |r - float64| = {np.abs(r - ref).max():.2e}")
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
    print(f"{torch.cuda.get_device_name()}: moments of 640 maps x 1376x1104 px: "
          f"{moments_ms:.1f} ms; plain FP32 Z Z^T: {floor_ms:.1f} ms; "
          f"ratio {moments_ms / floor_ms:.2f}")


if __name__ == "__main__":
    main()
