"""A whole mapsim run, timed: images per second and peak memory.

Run (GPU, the issue's target): ``python benchmarks/end_to_end.py --device cuda --precision fp16``
(and ``--precision tf32``) -- CNN10 (all 10 modules), 60 images of 1376 x 1104 px, Pearson plus
the metrics of ``--metrics`` that are installed, the study's tables (max, min, threshold, pivot)
written as CSV.
CPU: ``python benchmarks/end_to_end.py --device cpu --depth 6 --layers
blocks.0,blocks.1,blocks.3,blocks.5 --size 256x256 --images 20`` (``--kernel-size 3`` for fcn's
default kernels; the study's networks use 7).
The host's share of a run is in ``run.json``'s timings (``similarity``: the metrics and
tables on the main thread; ``aggregate_behind``: the aggregators in the worker processes).
``--memory 1,10,100`` runs the same spec on 1, 10 and 100 images, each in a fresh process, and
reports peak host memory (max RSS) and peak GPU memory for each. ``--quick`` shrinks everything.

Everything mapsim does is inside the timed region (reading the PNG files, forward pass,
extraction, moments, metrics, aggregation, writing the results folder); making the images and
building the model are not. Random-init weights (seeded): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import append, smooth_image  # noqa: E402

from mapsim.registry import load_registry  # noqa: E402
from mapsim.runner.run import run  # noqa: E402
from mapsim.spec.run_spec import validate_spec  # noqa: E402


def make_images(folder: Path, n: int, height: int, width: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        path = folder / f"img-{k:04d}.png"
        if not path.exists():
            pixels = (smooth_image(height, width, seed=k) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, compress_level=1)


def spec(args: argparse.Namespace, folder: Path, n: int) -> object:
    registry = load_registry()
    metrics = []
    for name in args.metrics.split(","):
        try:
            registry.get("metric", name)
            metrics.append(name)
        except Exception:  # noqa: BLE001 - not installed in this checkout
            pass
    paths = sorted(str(p) for p in folder.glob("img-*.png"))[:n]
    aggregators: list = args.aggregators.split(",")
    if "threshold" in aggregators and "euclidean" in metrics:  # a distance needs its own limit
        aggregators[aggregators.index("threshold")] = {
            "name": "threshold", "per_metric": {"euclidean": 1.5}}
    return validate_spec({
        "name": "bench",
        "models": {"cnn": {"architecture": {"name": "fcn", "depth": args.depth, "width": 64,
                                            "kernel_size": args.kernel_size,
                                            "conv": args.conv}, "seed": 0}},
        "layers": {"cnn": args.layers.split(",")},
        "images": {"name": "files", "paths": paths},
        "comparisons": [["cnn", "cnn"]],
        "metrics": metrics,
        "aggregators": aggregators,
        "engine": {**({"precision": args.precision} if args.precision else {}),
                   "precision_probe": args.probe == "on"},
        "statistics": {"spatial_null": args.spatial_null == "on"},
        "device": args.device,
    })


def one_run(args: argparse.Namespace, folder: Path, n: int, out: Path) -> dict:
    s = spec(args, folder, n)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run(s, out_dir=out, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    info = {
        "n": n, "seconds": seconds, "timings": result.info["timings_s"],
        "metrics": [m["name"] for m in result.info["metrics"]],
        "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if args.device.startswith("cuda"):
        info["gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return info


def growth(runs: list[dict]) -> str:
    """How much the peaks of the larger runs exceed those of the smallest, in percent."""
    first = runs[0]
    parts = []
    for key, label in (("rss_gib", "host RSS"), ("gpu_gib", "GPU")):
        if key in first:
            worst = max(100 * (r[key] / first[key] - 1) for r in runs[1:]) if runs[1:] else 0
            parts.append(f"{label} +{worst:.1f} %")
    return (f"largest growth over {first['n']} image(s): " + ", ".join(parts)
            + " [flat: within 5 %]")


def write_profile(profiler, path: Path) -> None:
    import io
    import pstats

    text = io.StringIO()
    profiler.dump_stats(str(path) + ".pstats")
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(60)
    path.write_text(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--kernel-size", type=int, default=7,
                        help="7: the study's networks; 3: fcn's default")
    parser.add_argument("--conv", default="auto", choices=["auto", "direct", "fft"],
                        help="fcn's convolution algorithm (auto: FFT on the CPU for 7x7)")
    parser.add_argument("--layers", default="blocks.*")
    parser.add_argument("--size", default="1104x1376", help="height x width")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--metrics", default="pearson,cosine,euclidean,cka")
    parser.add_argument("--aggregators", default="max,min,threshold,pivot")
    parser.add_argument("--precision", default=None, choices=["exact", "tf32", "fp16", "bf16"],
                        help="engine.precision of the forward pass (default: the spec default, "
                        "tf32)")
    parser.add_argument("--spatial-null", default="off", choices=["on", "off"],
                        help="statistics.spatial_null (default off here: issue 21's figures are "
                        "without it)")
    parser.add_argument("--probe", default="on", choices=["on", "off"],
                        help="engine.precision_probe (default on, as in a run): one more "
                        "forward pass of the first image, strict FP32")
    parser.add_argument("--memory", default=None, help="e.g. 1,10,100: peak memory per count")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, default=None,
                        help="write a cProfile summary of the measured run to this file")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.size, args.images = "64x80", min(args.images, 4)
    height, width = (int(v) for v in args.size.split("x"))
    work = args.workdir or Path(tempfile.gettempdir()) / f"mapsim-bench-{height}x{width}"
    folder = work / "images"
    if args.child is not None:  # one measured run in a fresh process, for --memory
        print(json.dumps(one_run(args, folder, args.child, work / f"out-{args.child}")))
        return
    counts = [int(c) for c in args.memory.split(",")] if args.memory else []
    make_images(folder, max([args.images, *counts]), height, width)

    lines = []
    if counts:
        runs = []
        for n in counts:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(n),
                   "--workdir", str(work)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            info = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append(info)
            gpu = f", peak GPU {info['gpu_gib']:.3f} GiB" if "gpu_gib" in info else ""
            lines.append(f"{n} images: peak host RSS {info['rss_gib']:.3f} GiB{gpu}, "
                         f"{info['seconds'] / n:.3f} s/image")
            print(lines[-1], flush=True)
        lines.append(growth(runs))
        print(lines[-1], flush=True)
    else:
        one_run(args, folder, 1, work / "warm")  # warm-up: first-call costs, cuDNN choice
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        info = one_run(args, folder, args.images, work / "out")
        if args.profile:
            profiler.disable()
            write_profile(profiler, args.profile)
        n, seconds = info["n"], info["seconds"]
        lines.append(f"CNN depth {args.depth} (kernel {args.kernel_size}, conv {args.conv}), "
                     f"precision {args.precision or 'default'}, spatial null "
                     f"{args.spatial_null}, precision probe {args.probe}, layers {args.layers}, {height}x{width} px, "
                     f"{n} images, metrics {', '.join(info['metrics'])}, aggregators "
                     f"{args.aggregators}: {seconds:.2f} s, {n / seconds:.2f} images/s, "
                     f"{seconds / n:.3f} s/image")
        loop = info["timings"].get("images", 0.0)
        if loop > 0:
            lines.append(f"the image loop alone (run.json's images: no start-up, precision probe "
                         f"or publishing): {n / loop:.2f} images/s; fixed costs "
                         f"{seconds - loop:.2f} s")
        lines.append("run.json timings (s): " + ", ".join(
            f"{k} {v}" for k, v in info["timings"].items()))
        if "gpu_gib" in info:
            lines.append(f"peak GPU memory {info['gpu_gib']:.2f} GiB")
    label = " memory" if counts else ""
    append("end_to_end" + label, args.device, lines, args.results)


if __name__ == "__main__":
    main()
