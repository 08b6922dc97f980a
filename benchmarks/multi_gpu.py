"""One run on 1 and on N GPUs (torchrun, NCCL): images per second and the scaling.

Run (the issue's target, on a machine with 2 GPUs): ``python benchmarks/multi_gpu.py`` --
CNN10 (all 10 modules), 256 images of 1104 x 1376 px, Pearson, cosine, Euclidean and linear
CKA, the study's tables; ``torchrun --standalone --nproc-per-node P -m mapsim run`` for P = 1
and P = 2 (``--procs 1,2``), each ``--repeats`` times, alternately. CPU, for a look at the
mechanics only: ``python benchmarks/multi_gpu.py --device cpu --quick``.

Per run it reads rank 0's run.json: ``total`` is the whole ``mapsim run`` call (building the
models, forking the table workers, every image, merging the blocks and publishing the
results); the command's wall time adds starting Python, importing torch and joining the
process group. Images per second are taken from ``total``; the scaling is the ratio of the
best runs. The results of the 1- and P-process runs are compared table by table.
NCCL's NVLink multicast is left off (``NCCL_NVLS_ENABLE=0`` and the like), as the device
machines require; each process gets an equal share of the cores (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import append  # noqa: E402
from end_to_end import make_images  # noqa: E402

METRICS = ["pearson", "cosine", {"name": "euclidean"}, {"name": "cka"}]
AGGREGATORS = ["max", "min", {"name": "threshold", "per_metric": {"euclidean": 1.5}}, "pivot"]


def write_spec(path: Path, images: list[Path], device: str, depth: int, block: int) -> None:
    spec = {
        "name": "multi-gpu",
        "models": {"cnn": {"architecture": {"name": "fcn", "depth": depth, "width": 64,
                                            "kernel_size": 7}, "seed": 0}},
        "layers": {"cnn": "blocks.*"},
        "images": {"name": "files", "paths": [str(p) for p in images]},
        "comparisons": [["cnn", "cnn"]],
        "metrics": METRICS,
        "aggregators": AGGREGATORS,
        "engine": {"block_images": block},
        "device": device,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def one_run(spec: Path, out: Path, procs: int) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # torchrun would give each process one thread; share the cores out instead
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1", OMP_NUM_THREADS=str(max(1, (cores or 1) // procs)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={procs}", "-m", "mapsim", "run", str(spec), "--out", str(out),
           "--overwrite", "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    info = json.loads((out / "run.json").read_text())
    return {"procs": procs, "wall": wall, "n": info["n_images"],
            "total": info["timings_s"]["total"], "timings": info["timings_s"],
            "blocks": info["blocks"], "device": info["device"]}


def largest_difference(a: Path, b: Path) -> str:
    """The largest absolute difference between the numeric columns of two results dirs."""
    worst, rows = 0.0, 0
    names = sorted(p.relative_to(a) for p in a.rglob("*.csv"))
    if names != sorted(p.relative_to(b) for p in b.rglob("*.csv")):
        return "different sets of tables"
    for name in names:
        x, y = pd.read_csv(a / name), pd.read_csv(b / name)
        if list(x.columns) != list(y.columns) or len(x) != len(y):
            return f"{name}: different columns or row counts"
        numeric = x.select_dtypes("number").columns
        other = [c for c in x.columns if c not in numeric]
        if not x[other].equals(y[other]):
            return f"{name}: different keys"
        diff = np.abs(x[numeric].to_numpy(float) - y[numeric].to_numpy(float))
        if (np.isnan(x[numeric].to_numpy(float)) != np.isnan(y[numeric].to_numpy(float))).any():
            return f"{name}: NaN in different places"
        worst = max(worst, float(np.nanmax(diff, initial=0.0)))
        rows += len(x)
    return f"{len(names)} tables, {rows} rows, same keys, largest |difference| {worst:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--procs", default="1,2", help="process counts, e.g. 1,2")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="1104x1376", help="height x width")
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--block", type=int, default=16, help="engine.block_images")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64x80 px, 24 images, 1 repeat")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.size, args.images, args.repeats, args.block = "64x80", 24, 1, 4
    height, width = (int(v) for v in args.size.split("x"))
    work = args.workdir or Path(tempfile.gettempdir()) / f"mapsim-multi-{height}x{width}"
    folder = work / "images"
    make_images(folder, args.images, height, width)
    images = sorted(folder.glob("img-*.png"))[: args.images]
    spec = work / "spec.yaml"
    write_spec(spec, images, args.device, args.depth, args.block)
    procs = [int(p) for p in args.procs.split(",")]

    warm = work / "warm.yaml"  # first-call costs and the page cache, for every process count
    write_spec(warm, images[: 2 * args.block * max(procs)], args.device, args.depth,
               args.block)
    for p in procs:
        one_run(warm, work / f"warm-{p}", p)

    runs: dict[int, list[dict]] = {p: [] for p in procs}
    for repeat in range(args.repeats):
        for p in procs:
            info = one_run(spec, work / f"out-{p}", p)
            runs[p].append(info)
            print(f"repeat {repeat + 1}, {p} process(es): {info['n']} images, run "
                  f"{info['total']:.2f} s = {info['n'] / info['total']:.2f} images/s, command "
                  f"{info['wall']:.2f} s; images per rank "
                  f"{info['blocks']['images_per_rank']}", flush=True)

    best = {p: min(r, key=lambda i: i["total"]) for p, r in runs.items()}
    base = best[procs[0]]
    lines = [f"CNN depth {args.depth} (width 64, kernel 7), all blocks, {height}x{width} px, "
             f"{args.images} images, blocks of {args.block}, metrics pearson, cosine, "
             f"euclidean, cka; aggregators max, min, threshold, pivot; "
             f"{args.repeats} repeat(s), best run per process count"]
    for p in procs:
        b = best[p]
        t = b["timings"]
        lines.append(
            f"{p} process(es) on {b['device']}{' etc.' if p > 1 else ''}: run {b['total']:.2f} s "
            f"= {b['n'] / b['total']:.2f} images/s (command {b['wall']:.2f} s = "
            f"{b['n'] / b['wall']:.2f} images/s); rank 0: setup {t.get('setup', 0):.2f} s, "
            f"images {t.get('images', 0):.2f} s, merge {t.get('merge', 0):.2f} s; all runs "
            + ", ".join(f"{r['total']:.2f}" for r in runs[p]) + " s")
    for p in procs[1:]:
        lines.append(
            f"scaling {p} vs {procs[0]}: {base['total'] / best[p]['total']:.2f}x from the run "
            f"times [target >= 1.8x for 2], {base['wall'] / best[p]['wall']:.2f}x from the "
            f"command times")
        lines.append(f"results of {p} vs {procs[0]} process(es): "
                     + largest_difference(work / f"out-{procs[0]}", work / f"out-{p}"))
    append(f"multi_gpu {args.procs}", args.device, lines, args.results)


if __name__ == "__main__":
    main()
