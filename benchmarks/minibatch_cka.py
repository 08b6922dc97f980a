"""Minibatch CKA on whole layer outputs (``cka``, ``samples: images``, ``pool: none``): a mapsim
run against a plain PyTorch minibatch CKA, in the same process, on the same images and batches.

GPU (issue 21, item 2): ``python benchmarks/minibatch_cka.py`` -- CNN10-sized fcn (10 blocks,
width 64, 7x7, seeded random weights), 60 synthetic images of 1104 x 1376, batches of 10,
every block of the network, all 55 layer pairs, device cuda when present.
CPU, small: ``python benchmarks/minibatch_cka.py --device cpu --images 12 --size 64x80
--depth 4 --width 8 --batch-size 4``.

Both sides are timed twice, alternating (reference, run, reference, run); the second of each is
reported. "Beyond the forward pass" is the wall time less the forward pass: for the run, its
wall time less ``timings_s.forward`` of run.json (forward pass and extraction, synchronised);
for the reference, its wall time less its own synchronised forward passes. The reference is
what a peer writes: forward hooks, a batch of flattened layer outputs on the device, centred
Gram matrices per layer (float32 products), the unbiased HSIC of every pair, CKA from the sums.
Also printed: the largest |difference| between the two sets of CKA values, and peak GPU memory.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from _report import append
from end_to_end import make_images

from mapsim.models.build import build_model
from mapsim.registry import load_registry
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec


def run_spec(args: argparse.Namespace, paths: list[str]) -> object:
    return validate_spec({
        "name": "minibatch-cka",
        "models": {"cnn": {"architecture": {"name": "fcn", "depth": args.depth,
                                            "width": args.width,
                                            "kernel_size": args.kernel_size}, "seed": 0}},
        "layers": {"cnn": ["blocks.*"]},
        "images": {"name": "files", "paths": paths},
        "comparisons": [["cnn", "cnn"]],
        "metrics": [{"name": "cka", "samples": "images", "pool": "none",
                     "batch_size": args.batch_size}],
        "aggregators": ["max"],
        "statistics": {"spatial_null": False},  # nothing to shift without map metrics
        "engine": {"block_images": args.block_images or args.images,
                   "precision": args.precision, "precision_probe": False},
        "device": args.device,
    })


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference(args: argparse.Namespace, images: list[torch.Tensor]) -> tuple[float, float, list]:
    """Plain PyTorch minibatch CKA: (wall seconds, forward seconds, CKA matrix)."""
    arch = load_registry().create("architecture", "fcn", {
        "depth": args.depth, "width": args.width, "kernel_size": args.kernel_size})
    module = build_model("ref", architecture=arch, seed=0).module.eval().to(args.device)
    names = [n for n, _ in module.named_modules() if n.startswith("blocks.") and n.count(".") == 1]
    captured: dict[str, torch.Tensor] = {}
    for name in names:
        dict(module.named_modules())[name].register_forward_hook(
            lambda m, i, o, name=name: captured.__setitem__(name, o.detach()))
    n_layers = len(names)
    sums = torch.zeros(n_layers, n_layers, dtype=torch.float64, device=args.device)
    forward = 0.0
    _sync(args.device)
    start = time.perf_counter()
    size = args.batch_size
    cuts = list(range(0, len(images), size)) + [len(images)]
    batches = list(itertools.pairwise(cuts))
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] < 4:
        batches[-2:] = [(batches[-2][0], batches[-1][1])]
    for lo, hi in batches:
        features: list[list[torch.Tensor]] = [[] for _ in names]
        for k in range(lo, hi):
            began = time.perf_counter()
            with torch.inference_mode():
                module(images[k].to(args.device)[None])
            _sync(args.device)
            forward += time.perf_counter() - began
            for i, name in enumerate(names):
                features[i].append(captured[name].reshape(-1))
        grams = []
        for i in range(n_layers):
            x = torch.stack(features[i])
            x = x - x.mean(dim=0, keepdim=True)
            gram = (x @ x.T).double()
            gram.fill_diagonal_(0.0)
            grams.append(gram)
            features[i] = []
        k0 = torch.stack(grams)
        m = hi - lo
        rows = k0.sum(dim=2)
        totals = rows.sum(dim=1)
        hsic = (torch.einsum("lij,kij->lk", k0, k0)
                + torch.outer(totals, totals) / ((m - 1) * (m - 2))
                - 2.0 / (m - 2) * rows @ rows.T) / (m * (m - 3))
        sums += m * hsic
    diag = torch.diagonal(sums)
    cka = (sums / torch.sqrt(torch.outer(diag, diag))).cpu()
    _sync(args.device)
    return time.perf_counter() - start, forward, cka.tolist()


def mapsim_run(args: argparse.Namespace, paths: list[str], out: Path) -> tuple[float, dict,
                                                                               pd.DataFrame]:
    spec = run_spec(args, paths)
    _sync(args.device)
    start = time.perf_counter()
    result = run(spec, out_dir=out, overwrite=True, progress=False)
    _sync(args.device)
    seconds = time.perf_counter() - start
    table = pd.read_csv(result.out_dir / "layer_similarity.csv")
    return seconds, result.info["timings_s"], table[table.image == "all-images"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", default="1104x1376", help="height x width")
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--block-images", type=int, default=None,
                        help="engine.block_images (default: all images in one block)")
    parser.add_argument("--precision", default="tf32", choices=["exact", "tf32", "fp16", "bf16"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    work = args.workdir or Path(tempfile.gettempdir()) / f"mapsim-bench-{height}x{width}"
    folder = work / "images"
    make_images(folder, args.images, height, width)
    paths = sorted(str(p) for p in folder.glob("img-*.png"))[: args.images]
    # the reference's inputs: the images as mapsim's files dataset gives them (read beforehand)
    dataset = load_registry().create("dataset", "files", {"paths": paths})
    images = [torch.from_numpy(item.image) for item in dataset]
    # the reference's forward pass under the same precision policy as the run's
    from mapsim.engine.precision import forward_precision

    timings = []
    for _ in range(2):
        with forward_precision(args.precision, torch.device(args.device)):
            ref = reference(args, images)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        mine = mapsim_run(args, paths, work / "out-minibatch-cka")
        peak = (torch.cuda.max_memory_allocated() / 2**30
                if args.device.startswith("cuda") else float("nan"))
        timings.append((ref, mine, peak))
    (ref_s, ref_fwd, ref_cka), (run_s, run_timings, table), peak = timings[-1]
    layers = sorted({*table.layer_a}, key=lambda s: int(s.split(".")[-1]))
    worst = 0.0
    for row in table.itertuples():
        expected = ref_cka[layers.index(row.layer_a)][layers.index(row.layer_b)]
        worst = max(worst, abs(row.value - expected) if math.isfinite(row.value) else math.inf)
    beyond_run = run_s - run_timings.get("forward", 0.0)
    lines = [
        (f"{args.images} images of {height} x {width}, fcn depth {args.depth} width "
        f"{args.width} {args.kernel_size}x{args.kernel_size}, {len(layers)} layers "
        f"({len(layers) * (len(layers) + 1) // 2} pairs), batches of {args.batch_size}, "
        f"engine.block_images {args.block_images or args.images}, precision {args.precision}, "
        f"device {args.device}"),
        f"mapsim run: {run_s:.2f} s wall, forward {run_timings.get('forward', 0.0):.2f} s, "
        f"beyond the forward pass {beyond_run:.2f} s (of which setup, merge and publish "
        f"{sum(run_timings.get(k, 0.0) for k in ('setup', 'merge', 'publish')):.2f} s; the "
        f"image loop beyond the forward pass "
        f"{run_timings.get('images', 0.0) - run_timings.get('forward', 0.0):.2f} s); run.json "
        f"timings (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in run_timings.items() if v),
        (f"plain PyTorch reference (same run): {ref_s:.2f} s wall, forward {ref_fwd:.2f} s, "
        f"beyond the forward pass {ref_s - ref_fwd:.2f} s"),
        (f"ratio beyond forward, mapsim / reference: {beyond_run / max(ref_s - ref_fwd, 1e-9):.2f}"
        f"; first pair (cold): mapsim {timings[0][1][0] - timings[0][1][1].get('forward', 0):.2f} "
        f"s, reference {timings[0][0][0] - timings[0][0][1]:.2f} s"),
        f"largest |CKA mapsim - reference| over {len(table)} rows: {worst:.2e}"
        + (f"; peak GPU memory of the run {peak:.1f} GiB" if math.isfinite(peak) else ""),
    ]
    append("Minibatch CKA on whole layer outputs (cka, samples: images, pool: none)",
           args.device, lines, args.results)


if __name__ == "__main__":
    main()
