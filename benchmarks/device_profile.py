"""Where a GPU run's device time goes, and what the forward pass could gain (issue 21, item 3).

Run on one GPU: ``python benchmarks/device_profile.py`` (CNN10-sized fcn, 7x7, width 64,
1104 x 1376 px, seeded random weights, batch norms folded and channels-last as mapsim prepares
it). Three parts, each printed and appended to RESULTS.md (or ``--results``):

1. ``torch.profiler`` over a mapsim run of ``--images`` images (after a warm-up run) for each
   precision of ``--precisions``: the kernels by total device time, per image, in groups
   (convolution, the moments' products, the writes into the moments buffer, casts, the rest).
2. The forward pass alone, per precision: eager (what mapsim runs, cuDNN's heuristic choice
   of algorithm), eager with ``cudnn.benchmark`` (algorithms timed once per shape), replayed
   as a CUDA graph, and ``torch.compile`` (default mode; its compile time is printed apart), each the median of
   ``--repeats`` timed passes, device time by CUDA events.
3. What the precision probe's ``exact`` pass costs: strict FP32 in channels-last (what the
   probe runs) against NCHW.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import append  # noqa: E402
from end_to_end import make_images  # noqa: E402

from mapsim.engine.precision import forward_precision  # noqa: E402
from mapsim.models.build import build_model  # noqa: E402
from mapsim.registry import load_registry  # noqa: E402
from mapsim.runner.run import run  # noqa: E402
from mapsim.spec.run_spec import validate_spec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


GROUPS = (("convolution", ("conv", "cudnn", "implicit_gemm", "xmma", "sm90_", "winograd",
                           "fprop")),
          ("moments products (gemm)", ("gemm", "sgemm", "bmm", "cutlass")),
          ("reductions (sum/mean)", ("reduce",)),
          ("elementwise / copies", ("elementwise", "copy", "cast", "fill", "vectorized")),)


def group_of(name: str) -> str:
    low = name.lower()
    for label, keys in GROUPS:
        if any(k in low for k in keys):
            return label
    return "other"


def model(device: str, depth: int) -> torch.nn.Module:
    arch = load_registry().create("architecture", "fcn", {"depth": depth, "width": 64,
                                                          "kernel_size": 7})
    module = build_model("cnn", architecture=arch, seed=0).module.to(device).eval()
    module.fuse_for_inference([])
    return module.to(memory_format=torch.channels_last)


def device_ms(fn, repeats: int) -> float:
    """Median device time of ``fn()`` in ms (CUDA events; wall time on the CPU), after two
    untimed calls."""
    for _ in range(2):
        fn()
    if not torch.cuda.is_available():  # --smoke on the CPU
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - began))
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_run(args: argparse.Namespace, paths: list[str], precision: str) -> list[str]:
    spec = validate_spec({
        "name": "profile",
        "models": {"cnn": {"architecture": {"name": "fcn", "depth": args.depth, "width": 64,
                                            "kernel_size": 7}, "seed": 0}},
        "layers": {"cnn": ["blocks.*"]},
        "images": {"name": "files", "paths": paths},
        "comparisons": [["cnn", "cnn"]],
        "metrics": ["pearson", "cosine", "euclidean", "cka"],
        "aggregators": ["max", "min", {"name": "threshold", "per_metric": {"euclidean": 1.5}},
                        "pivot"],
        "statistics": {"spatial_null": False},
        "engine": {"precision": precision, "precision_probe": False},
        "device": DEVICE,
    })
    with tempfile.TemporaryDirectory() as tmp:
        warm = spec.model_copy(update={"images": spec.images.model_copy(
            update={"paths": paths[:1]})})
        run(warm, out_dir=Path(tmp) / "warm", overwrite=True, progress=False)
        synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if DEVICE == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            run(spec, out_dir=Path(tmp) / "run", overwrite=True, progress=False)
            synchronize()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue  # operators (their kernels are counted on their own) and host events
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        if device_us > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + device_us
    n = len(paths)
    total = sum(kernels.values()) / 1000 / n
    grouped: dict[str, float] = {}
    for name, us in kernels.items():
        grouped[group_of(name)] = grouped.get(group_of(name), 0.0) + us / 1000 / n
    lines = [f"{precision}: device time {total:.1f} ms/image over {n} images; by group: "
             + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(grouped.items(),
                                                              key=lambda kv: -kv[1]))]
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]
    lines += [f"  {us / 1000 / n:7.2f} ms/image  {name[:110]}" for name, us in top]
    return lines


def forward_variants(args: argparse.Namespace, precision: str) -> list[str]:
    height, width = (int(v) for v in args.size.split("x"))
    module = model(DEVICE, args.depth)
    blocks = module.blocks  # mapsim captures the blocks; the 1x1 head is not needed
    x = torch.rand(1, 1, height, width, device=DEVICE).to(memory_format=torch.channels_last)
    device = torch.device(DEVICE)

    def eager():
        with torch.inference_mode(), forward_precision(precision, device):
            return blocks(x)

    lines = []
    torch.backends.cudnn.benchmark = False  # what mapsim runs today
    eager_ms = device_ms(eager, args.repeats)
    lines.append(f"{precision} forward (10 blocks), eager (cudnn.benchmark off, mapsim's "
                 f"setting): {eager_ms:.2f} ms")
    torch.backends.cudnn.benchmark = True
    tuned_ms = device_ms(eager, args.repeats)
    lines.append(f"{precision} forward, eager with cudnn.benchmark on: {tuned_ms:.2f} ms "
                 f"({tuned_ms / eager_ms:.2f}x)")
    if DEVICE != "cuda":
        return lines
    try:  # a CUDA graph of the same forward pass
        static = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode(), forward_precision(precision,
                                                                                  device):
            for _ in range(3):
                blocks(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), forward_precision(precision, device), \
                torch.cuda.graph(graph):
            blocks(static)
        graph_ms = device_ms(graph.replay, args.repeats)
        lines.append(f"{precision} forward, CUDA graph replay: {graph_ms:.2f} ms "
                     f"({graph_ms / eager_ms:.2f}x eager)")
    except Exception as exc:  # noqa: BLE001 - report, go on
        lines.append(f"{precision} CUDA graph failed: {type(exc).__name__}: {exc}"[:300])
    if args.compile:
        try:
            compiled = torch.compile(blocks)
            began = time.perf_counter()

            def run_compiled():
                with torch.inference_mode(), forward_precision(precision, device):
                    return compiled(x)

            run_compiled()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - began
            compiled_ms = device_ms(run_compiled, args.repeats)
            lines.append(f"{precision} forward, torch.compile: {compiled_ms:.2f} ms "
                         f"({compiled_ms / eager_ms:.2f}x eager; compiling took "
                         f"{compile_s:.1f} s)")
        except Exception as exc:  # noqa: BLE001
            lines.append(f"{precision} torch.compile failed: {type(exc).__name__}: {exc}"[:300])
    return lines


def probe_variants(args: argparse.Namespace) -> list[str]:
    if DEVICE != "cuda":
        return []
    height, width = (int(v) for v in args.size.split("x"))
    device = torch.device(DEVICE)
    last = model(DEVICE, args.depth).blocks
    plain = model(DEVICE, args.depth).to(memory_format=torch.contiguous_format).blocks
    x_last = torch.rand(1, 1, height, width, device="cuda").to(
        memory_format=torch.channels_last)
    x_plain = x_last.contiguous()

    def run_with(blocks, x):
        def fn():
            with torch.inference_mode(), forward_precision("exact", device):
                return blocks(x)
        return fn

    torch.backends.cudnn.benchmark = False
    cl = device_ms(run_with(last, x_last), 5)
    nchw = device_ms(run_with(plain, x_plain), 5)
    return [f"exact (strict FP32) forward: channels-last {cl:.1f} ms, NCHW {nchw:.1f} ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", default="1104x1376", help="height x width")
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--precisions", default="tf32,fp16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on the CPU at a tiny size (numbers meaningless)")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.images, args.depth, args.repeats, args.compile = "32x40", 2, 2, 2, False
        args.precisions = "exact"
    elif not torch.cuda.is_available():
        raise SystemExit("device_profile.py needs a CUDA device (or --smoke on the CPU)")
    height, width = (int(v) for v in args.size.split("x"))
    folder = Path(tempfile.gettempdir()) / f"mapsim-bench-{height}x{width}" / "images"
    make_images(folder, args.images, height, width)
    paths = sorted(str(p) for p in folder.glob("img-*.png"))[: args.images]
    lines = []
    for precision in args.precisions.split(","):
        for line in profile_run(args, paths, precision):
            print(line, flush=True)
            lines.append(line)
    for precision in args.precisions.split(","):
        for line in forward_variants(args, precision):
            print(line, flush=True)
            lines.append(line)
    for line in probe_variants(args):
        print(line, flush=True)
        lines.append(line)
    if not args.smoke:
        append("Device time per image, by kernel group; forward pass variants", DEVICE, lines,
               args.results)


if __name__ == "__main__":
    main()
