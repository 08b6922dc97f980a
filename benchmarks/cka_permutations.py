"""What CKA's permutation p-value costs (issue 15: `cka` with `samples: images`, `permutations`).

Two 6-layer `fcn` networks (width 16) on synthetic vessel images, `pearson` plus `cka` over
images, spatial null and intervals off: the whole run with `permutations: 999` against `0`,
alternating in this one process, best of ``--repeats``; prints both times and their ratio.

Run: python benchmarks/cka_permutations.py [--images 64] [--size 64] [--repeats 3]
[--device cpu|cuda]. Appends to benchmarks/RESULTS.md (with the command).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import append  # noqa: E402

from mapsim.runner.run import run  # noqa: E402
from mapsim.spec.run_spec import validate_spec  # noqa: E402


def spec(permutations: int, images: int, size: int, device: str) -> object:
    layers = [f"blocks.{i}" for i in range(6)]
    return validate_spec({
        "name": "cka-permutations",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 6, "width": 16}, "seed": 1},
                   "b": {"architecture": {"name": "fcn", "depth": 6, "width": 16}, "seed": 2}},
        "images": {"name": "synthetic-vessels", "count": images, "size": [size, size],
                   "seed": 5},
        "layers": {"a": layers, "b": layers},
        "comparisons": [["a", "b"]],
        "metrics": [{"name": "pearson"},
                    {"name": "cka", "label": "cka-images", "samples": "images",
                     "permutations": permutations}],
        "aggregators": ["max"], "device": device,
        "statistics": {"spatial_null": False, "confidence": None},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    best = {0: float("inf"), 999: float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for permutations in (0, 999):
                out = Path(tmp) / f"r{round_}-{permutations}"
                started = time.perf_counter()
                run(spec(permutations, args.images, args.size, args.device), out_dir=out,
                    progress=False)
                if round_:
                    best[permutations] = min(best[permutations],
                                             time.perf_counter() - started)
    append("cka permutation p-values: run time with 999 permutations against 0",
           args.device, [
               f"two fcn depth 6 width 16, {args.images} images of {args.size}x{args.size}, "
               f"pearson + cka over images (batch 32), {args.device}, best of {args.repeats} "
               f"after a warm-up: permutations 0 {best[0]:.2f} s, 999 {best[999]:.2f} s, "
               f"ratio {best[999] / best[0]:.2f}"], args.results)


if __name__ == "__main__":
    main()
