"""mapsim's engine against the study's per-pair method, on the same maps in one run.

Run: ``python benchmarks/perpair.py`` (CNN6, layers L1 L2 L4 L6, 64..512 px, every pair) or
``--quick`` (64 and 128 px). For each size the maps of one image are captured once; then

* **per-pair** (a faithful re-implementation of the original library): a Python loop over every
  ordered map pair of every layer pair, ``torch.corrcoef`` on the two flattened float32 maps,
  the zero-map rule (std < 1e-10: 1.0 if both maps are zero, 0.0 if one is), one table row per
  pair, then a DataFrame;
* **mapsim**: stack, moments, Pearson with ``dead_maps: original`` and the same pairs table;
* a **float64 reference** (numpy corrcoef in float64 with the same zero rule).

mapsim's time is the median of five runs. It prints the time of each, the ratio, each
method's largest |error| against float64 and the largest difference between the two methods,
and appends them to benchmarks/RESULTS.md.
``--max-pairs N`` times a random sample of N pairs per size and extrapolates (reported as such).
Random-init weights (seeded): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import append, smooth_image  # noqa: E402

from mapsim.tables.aggregation import pairs_table  # noqa: E402
from mapsim.models.build import build_model  # noqa: E402
from mapsim.engine.moments import compute_moments  # noqa: E402
from mapsim.plugins.metrics.pearson import Pearson  # noqa: E402
from mapsim.registry import load_registry  # noqa: E402
from mapsim.engine.similarity import map_similarity, stack_maps  # noqa: E402
from mapsim.plugins.hooks import HooksExtractor  # noqa: E402

LAYERS = {"L1": "blocks.0", "L2": "blocks.1", "L4": "blocks.3", "L6": "blocks.5"}
ZERO_STD = 1e-10
#: mapsim's time is the median of this many runs (the per-pair loop runs once: it is long)
ENGINE_REPEATS = 5


def capture(model: torch.nn.Module, size: int, device: str) -> dict[str, torch.Tensor]:
    image = torch.from_numpy(smooth_image(size, size).astype(np.float32))
    image = ((image - image.mean()) / image.std())[None, None].to(device)
    out = HooksExtractor().extract(model, list(LAYERS.values()), image)
    return {label: out[path][0] for label, path in LAYERS.items()}


def per_pair(maps: dict[str, torch.Tensor], pairs: list[tuple[str, int, str, int]]) -> pd.DataFrame:
    """The original method: one pair at a time, one row per pair."""
    rows = []
    for la, i, lb, j in pairs:
        x = maps[la][i].flatten()
        y = maps[lb][j].flatten()
        zero_a = bool(x.std() < ZERO_STD)
        zero_b = bool(y.std() < ZERO_STD)
        if zero_a and zero_b:
            r = 1.0
        elif zero_a or zero_b:
            r = 0.0
        else:
            r = abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
        rows.append({"map_a": i, "map_b": j, "value": r, "dead_a": zero_a, "dead_b": zero_b,
                     "layer_a": la, "layer_b": lb})
    return pd.DataFrame(rows)


def engine(maps: dict[str, torch.Tensor]) -> pd.DataFrame:
    """mapsim: one product for all maps, then the same long table."""
    stack = stack_maps({"cnn6": maps}, ["cnn6"])
    moments = compute_moments(stack.z)
    sim = map_similarity(Pearson(), stack, moments, "cnn6", "cnn6", dead_policy="original",
                         dead_std=ZERO_STD)
    return pairs_table(sim)


def reference(maps: dict[str, torch.Tensor]) -> np.ndarray:
    """float64 |r| of every map against every map (stacked order), zero rule applied."""
    z = torch.cat([m.reshape(m.shape[0], -1) for m in maps.values()]).cpu().double().numpy()
    zero = z.std(axis=1) < ZERO_STD
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.abs(np.corrcoef(z))
    r[zero[:, None] | zero[None, :]] = 0.0
    r[zero[:, None] & zero[None, :]] = 1.0
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--quick", action="store_true", help="64 and 128 px only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="time a random sample of this many pairs and extrapolate")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    sizes = [64, 128] if args.quick else args.sizes
    arch = load_registry().create("architecture", "fcn", {"depth": 6, "width": 64,
                                                          "kernel_size": 7})
    model = build_model("cnn6", architecture=arch, seed=0).module.to(args.device).eval()
    lines = []
    for size in sizes:
        maps = capture(model, size, args.device)
        labels = list(maps)
        offsets = dict(zip(labels, np.cumsum([0] + [m.shape[0] for m in maps.values()])))
        every = [(la, i, lb, j) for la in labels for i in range(maps[la].shape[0])
                 for lb in labels for j in range(maps[lb].shape[0])]
        pairs = every
        if args.max_pairs is not None and args.max_pairs < len(every):
            rng = np.random.default_rng(size)
            pairs = [every[k] for k in sorted(rng.choice(len(every), args.max_pairs,
                                                         replace=False))]
        ref = reference(maps)

        start = time.perf_counter()
        slow = per_pair(maps, pairs)
        t_pair = (time.perf_counter() - start) * len(every) / len(pairs)

        engine(maps)  # warm-up (first-call allocations)
        times = []
        for _ in range(ENGINE_REPEATS):  # a run of ~0.2 s is easily hit by a hiccup
            start = time.perf_counter()
            fast = engine(maps)
            times.append(time.perf_counter() - start)
        t_engine = float(np.median(times))

        ia = np.array([offsets[la] + i for la, i, _, _ in pairs])
        ib = np.array([offsets[lb] + j for _, _, lb, j in pairs])
        err_pair = np.abs(slow["value"].to_numpy() - ref[ia, ib]).max()
        fa = fast["layer_a"].map(offsets).to_numpy() + fast["map_a"].to_numpy()
        fb = fast["layer_b"].map(offsets).to_numpy() + fast["map_b"].to_numpy()
        fast_values = np.full(ref.shape, np.nan)
        fast_values[fa, fb] = fast["value"].to_numpy()
        fast_dead = np.zeros(ref.shape[0], dtype=bool)
        fast_dead[fa] = fast["dead_a"].to_numpy()
        err_engine = np.abs(fast_values - ref).max()
        agree = np.abs(slow["value"].to_numpy() - fast_values[ia, ib]).max()
        same_flags = bool((slow["dead_a"].to_numpy() == fast_dead[ia]).all()
                          and (slow["dead_b"].to_numpy() == fast_dead[ib]).all())
        sampled = "" if len(pairs) == len(every) else \
            f" (per-pair timed on {len(pairs)} sampled pairs, extrapolated)"
        lines.append(
            f"{size}x{size}, {ref.shape[0]} maps, {len(every)} pairs: per-pair {t_pair:.2f} s, "
            f"mapsim {t_engine * 1e3:.1f} ms, ratio {t_pair / t_engine:.0f}x; max |err| vs "
            f"float64: per-pair {err_pair:.1e}, mapsim {err_engine:.1e}; max |per-pair - mapsim| "
            f"{agree:.1e}; zero flags agree {same_flags}{sampled}"
        )
        print(lines[-1], flush=True)
    append("perpair (CNN6 L1 L2 L4 L6, Pearson)", args.device, lines, args.results)


if __name__ == "__main__":
    main()
