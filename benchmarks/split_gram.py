"""Microbenchmark: the similarity step's Gram product in plain FP32 against split-precision
products on tensor cores (3xTF32 and 3xBF16: x = hi + lo, x y^T ~ hi hi'^T + hi lo'^T + lo hi'^T).

Run: ``python benchmarks/split_gram.py --device cuda`` (CNN10-like: 640 maps, 1104 x 1376 px,
ReLU-like non-negative smooth maps, centred per chunk as mapsim does). Prints the time of each
variant, its ratio to FP32 in the same run, and the largest error of the resulting Pearson r
against a float64 reference.
"""
from __future__ import annotations

import argparse
import time

import torch


def split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if dtype is torch.float32:  # TF32: round the mantissa to 10 bits
        hi = (x.view(torch.int32) & ~0x1FFF).view(torch.float32)
        return hi, x - hi
    hi = x.to(dtype)
    return hi, (x - hi.to(torch.float32)).to(dtype)


def set_tf32(on: bool) -> None:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if on else "ieee"
    else:
        matmul.allow_tf32 = on


def gram_fp32(x: torch.Tensor) -> torch.Tensor:
    set_tf32(False)
    return torch.bmm(x, x.transpose(1, 2)).sum(0, dtype=torch.float64)


def gram_split(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    hi, lo = split(x, dtype)
    if dtype is torch.float32:
        set_tf32(True)
    hh = torch.bmm(hi, hi.transpose(1, 2))
    hl = torch.bmm(hi, lo.transpose(1, 2))
    out = hh.to(torch.float32) + hl.to(torch.float32) + hl.transpose(1, 2).to(torch.float32)
    set_tf32(False)
    return out.sum(0, dtype=torch.float64)


def pearson(g: torch.Tensor) -> torch.Tensor:
    d = g.diagonal().sqrt()
    return g / d[:, None] / d[None, :]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--maps", type=int, default=640)
    p.add_argument("--pixels", type=int, default=1104 * 1376)
    p.add_argument("--chunk", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    dev = torch.device(a.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(64, a.pixels, generator=g)
    mix = torch.randn(a.maps, 64, generator=g)
    z = torch.relu(mix @ base + 0.3 * torch.randn(a.maps, a.pixels, generator=g)).to(dev)
    n_chunks = a.pixels // a.chunk
    x = z[:, : n_chunks * a.chunk].reshape(a.maps, n_chunks, a.chunk).transpose(0, 1)
    x = (x - x.mean(dim=2, keepdim=True)).contiguous()  # centred per chunk
    ref = torch.bmm(x.double(), x.double().transpose(1, 2)).sum(0)
    r_ref = pearson(ref)
    variants = {"fp32": lambda: gram_fp32(x),
                "3xtf32": lambda: gram_split(x, torch.float32),
                "3xbf16": lambda: gram_split(x, torch.bfloat16),
                "3xfp16": lambda: gram_split(x, torch.float16)}
    times = {}
    for name, fn in variants.items():
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        times[name] = best
        err = (pearson(out) - r_ref).abs().max().item()
        print(f"{name:7s} {best * 1e3:8.2f} ms  x{best / times['fp32']:.3f} of fp32  "
              f"max |delta r| vs float64 {err:.2e}")
    if dev.type == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__)


if __name__ == "__main__":
    main()
