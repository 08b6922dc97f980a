"""The cost of the measures of issue 19 beside Pearson's, on the CPU, in one run.

Two layers of ``--maps`` maps each over ``--size`` x ``--size`` pixels (smooth, rectified,
partly correlated, like conv layers after a ReLU) are compared per image, as a run does:

* the shared product: ``compute_moments`` of the stacked maps (every moment-based measure,
  Pearson included, reads its values off it);
* Pearson = the product + its (C_a, C_b) values; the CCA family and Procrustes add only their
  read-off from the moments (their ``from_maps`` path is timed too, for reference);
* RSA and mutual k-NN get the maps (pixel positions subsampled to ``subsample``);
* the ``match`` aggregator beside ``max`` on a similarity matrix of 4 layers of ``--maps``.

Ratios are to Pearson's time (product + values). Prints the table and appends it to
benchmarks/RESULTS.md. Run: python benchmarks/measures.py [--size 256 --maps 64 --repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import append  # noqa: E402

from mapsim import Block, SimilarityMatrix, best_partners  # noqa: E402
from mapsim.engine.moments import compute_moments  # noqa: E402
from mapsim.registry import load_registry  # noqa: E402


def layer_maps(rng: np.random.Generator, n_maps: int, size: int) -> torch.Tensor:
    """(maps, pixels) float32: smooth random mixtures of 6 sources, rectified."""
    base = rng.standard_normal((6, size, size))
    for axis in (1, 2):
        for _ in range(3):
            base = (base + np.roll(base, 1, axis=axis) + np.roll(base, -1, axis=axis)) / 3
    maps = np.einsum("ck,khw->chw", rng.standard_normal((n_maps, 6)), base)
    maps += 0.2 * rng.standard_normal(maps.shape)
    return torch.from_numpy(np.maximum(maps, 0.0).reshape(n_maps, -1).astype(np.float32))


def best_time(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--maps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y = layer_maps(rng, args.maps, args.size), layer_maps(rng, args.maps, args.size)
    z = torch.cat([x, y])
    rows, cols = slice(0, args.maps), slice(args.maps, 2 * args.maps)
    registry = load_registry()
    moments = compute_moments(z)
    product = best_time(lambda: compute_moments(z), args.repeats)
    pearson = registry.create("metric", "pearson", {})
    pearson_values = best_time(lambda: pearson.from_moments(moments, rows, cols), args.repeats)
    reference = product + pearson_values
    lines = [f"two layers of {args.maps} maps, {args.size} x {args.size} pixels, one image, "
             f"CPU, best of {args.repeats}; ratio = time / Pearson's (product + values)",
             f"shared product (compute_moments): {product * 1e3:.1f} ms; Pearson values "
             f"{pearson_values * 1e3:.2f} ms; Pearson total {reference * 1e3:.1f} ms (1.00)"]
    measured = [
        ("svcca", {}, True), ("pwcca", {}, True), ("procrustes", {}, True),
        ("procrustes", {"angular": True}, True),
        ("rsa", {}, False), ("rsa", {"dissimilarity": "correlation"}, False),
        ("mutual_knn", {}, False), ("mutual_knn", {"distance": "cosine"}, False),
    ]
    for name, params, moment_based in measured:
        metric = registry.create("metric", name, params)
        label = name + "".join(f" {k}={v}" for k, v in params.items())
        maps_time = best_time(lambda: metric.from_maps(x, y), args.repeats)
        if moment_based:
            own = best_time(lambda: metric.from_moments(moments, rows, cols), args.repeats)
            lines.append(
                f"{label}: from the moments {own * 1e3:.2f} ms after the shared product "
                f"(with it {(product + own) / reference:.2f}x Pearson); from the maps "
                f"{maps_time * 1e3:.1f} ms ({maps_time / reference:.2f}x)")
        else:
            lines.append(f"{label} (1024 positions): {maps_time * 1e3:.1f} ms "
                         f"({maps_time / reference:.2f}x Pearson)")
    blocks = [Block("A", f"L{k}", k * args.maps, (k + 1) * args.maps, (args.size, args.size))
              for k in range(4)]
    values = np.abs(np.corrcoef(rng.standard_normal((4 * args.maps, 200))))
    sim = SimilarityMatrix("pearson", "A", "A", values, blocks, blocks,
                           np.zeros(4 * args.maps, bool), np.zeros(4 * args.maps, bool))
    match = registry.create("aggregator", "match", {})
    t_max = best_time(lambda: best_partners(sim), args.repeats)
    t_match = best_time(lambda: match.aggregate(sim, {}), args.repeats)
    lines.append(f"tables of 4 x 4 layer pairs of {args.maps} maps: max {t_max * 1e3:.1f} ms, "
                 f"match {t_match * 1e3:.1f} ms ({t_match / t_max:.1f}x max)")
    append("measures (issue 19) beside Pearson, CPU", "cpu", lines, args.results)


if __name__ == "__main__":
    main()
