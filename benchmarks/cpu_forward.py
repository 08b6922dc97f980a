"""The CPU forward pass of a run, this checkout against a base commit, interleaved.

``python benchmarks/cpu_forward.py --base HEAD`` (issue 21, item 4): CNN6 (fcn depth 6, width
64, 7x7, seeded random weights, batch norms with non-trivial statistics), layers blocks.0,
blocks.1, blocks.3, blocks.5, one 256 x 256 image at a time, FP32, prepared as a run prepares
it (``prepare_model``: eval, batch norms folded) and extracted with the run's extractor (hooks,
``torch.inference_mode``). The base commit's ``src`` is unpacked with ``git archive`` into a
temporary folder; each round runs the workload once per tree, alternating, each in a fresh
process (``PYTHONPATH`` points at the tree), so both see the same load of a shared machine.
Reported: per tree, the median seconds per image over the rounds, and the ratio new / base of
the medians (and the range of the per-round ratios). Speed on a shared machine varies, so only
the ratio within one run means much.

``--workload`` is the child process's entry point (not for direct use).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def workload(images: int, size: int, threads: int | None) -> dict:
    """Time the forward passes in this process (whichever mapsim PYTHONPATH gives)."""
    import torch

    from mapsim.models.prepare import prepare_model
    from mapsim.registry import load_registry
    from mapsim.spec.run_spec import validate_spec

    if threads:
        torch.set_num_threads(threads)
    spec = validate_spec({
        "name": "cpu-forward",
        "models": {"cnn": {"architecture": {"name": "fcn", "depth": 6, "width": 64,
                                            "kernel_size": 7}, "seed": 0}},
        "layers": {"cnn": ["blocks.0", "blocks.1", "blocks.3", "blocks.5"]},
        "images": {"name": "synthetic-vessels", "count": 1, "size": [size, size]},
        "comparisons": [["cnn", "cnn"]],
        "device": "cpu",
    })
    registry = load_registry()
    model = prepare_model("cnn", spec, registry, Path.cwd(), torch.device("cpu"))
    module = model.loaded.module
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 1, size, size, generator=generator) for _ in range(images + 1)]
    paths = list(model.layers.values())
    checksum = 0.0
    model.extractor.extract(module, paths, inputs[-1])  # warm-up: caches, allocator
    start, cpu = time.perf_counter(), time.process_time()
    for x in inputs[:images]:
        out = model.extractor.extract(module, paths, x)
        checksum += float(out[paths[-1]].double().sum())
    seconds = (time.perf_counter() - start) / images
    cpu = (time.process_time() - cpu) / images
    return {"s_per_image": seconds, "cpu_s_per_image": cpu, "threads": torch.get_num_threads(),
            "checksum": checksum}


def unpack(commit: str) -> Path:
    """The base commit's src/ in a temporary folder."""
    sha = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True, text=True,
                         capture_output=True).stdout.strip()
    target = Path(tempfile.gettempdir()) / f"mapsim-base-{sha[:12]}"
    if not (target / "src" / "mapsim").is_dir():
        data = subprocess.run(["git", "archive", sha, "src"], cwd=ROOT, check=True,
                              capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(data)) as archive:
            archive.extractall(target, filter="data")
    return target / "src"


def child(tree: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, __file__, "--workload", "--images", str(args.images), "--size",
           str(args.size)] + (["--threads", str(args.threads)] if args.threads else [])
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tree)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=5, help="timed images per process")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload:
        print(json.dumps(workload(args.images, args.size, args.threads)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import append

    trees = {"base": unpack(args.base), "new": ROOT / "src"}
    times: dict[str, list[float]] = {"base": [], "new": []}
    cpu: dict[str, list[float]] = {"base": [], "new": []}
    checks: dict[str, float] = {}
    for r in range(args.rounds):
        order = ("base", "new") if r % 2 == 0 else ("new", "base")
        for name in order:
            info = child(trees[name], args)
            times[name].append(info["s_per_image"])
            cpu[name].append(info["cpu_s_per_image"])
            checks[name] = info["checksum"]
            print(f"round {r}: {name} {info['s_per_image']:.3f} s/image, CPU "
                  f"{info['cpu_s_per_image']:.3f} s/image", flush=True)
    base, new = statistics.median(times["base"]), statistics.median(times["new"])
    cpu_base, cpu_new = statistics.median(cpu["base"]), statistics.median(cpu["new"])
    ratios = [n / b for n, b in zip(times["new"], times["base"])]
    agree = abs(checks["new"] - checks["base"]) / max(abs(checks["base"]), 1e-30)
    append("CPU forward pass, this checkout against a base commit (interleaved)", "cpu", [
        (f"CNN6 7x7 width 64, layers blocks.0,1,3,5, {args.size}x{args.size}, FP32, "
        f"{args.images} images per process, {args.rounds} rounds alternating"),
        (f"base {args.base}: median {base:.3f} s/image; this checkout: median {new:.3f} "
        f"s/image; ratio new/base {new / base:.3f} (per round {min(ratios):.3f} to "
        f"{max(ratios):.3f})"),
        (f"CPU time of the process: base median {cpu_base:.3f} s/image, this checkout "
        f"{cpu_new:.3f} s/image, ratio {cpu_new / cpu_base:.3f}"),
        f"relative difference of the outputs' checksums: {agree:.1e}",
    ], args.results)


if __name__ == "__main__":
    main()
