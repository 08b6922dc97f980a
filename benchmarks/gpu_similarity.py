"""The similarity step for CNN10 at full resolution against a plain product, on the GPU.

Run: ``python benchmarks/gpu_similarity.py`` (CUDA; ``--quick --device cpu`` for a small check).
One image of 1376 x 1104 px goes through CNN10 (random-init weights, seeded: speed does not
depend on them); its 10 modules give 640 maps. Measured in the same run, medians of repeats:

* the **floor**: one plain FP32 product Z Z^T of the (640, P) maps with TF32 off;
* the **similarity step**, stacked maps: moments (symmetric blocked product, float32 chunks with
  TF32 off, float64 accumulation) and every requested metric's matrices on the host;
* the same step with the moments **built layer by layer** as the forward hooks do;
* a sweep of layouts (layer rows in the hooks, or symmetric blocks) and chunk sizes;
* the forward pass alone, with and without cudnn.benchmark (CUDA);
* the **per-pair method** on the GPU (maps already there): a sample of pairs, one
  ``torch.corrcoef`` and one table row each, extrapolated to 640 x 640 = 409,600 pairs;
* accuracy: Pearson's largest |r - r64| against a float64 product computed on the device.

The metric list is a parameter (``--metrics``; names not installed are reported and skipped).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import append, smooth_image  # noqa: E402

from mapsim.models.build import build_model  # noqa: E402
from mapsim.engine.moments import Moments, MomentsBuilder, compute_moments  # noqa: E402
from mapsim.registry import load_registry  # noqa: E402
from mapsim.engine.similarity import (  # noqa: E402
    MapStack,
    layer_similarity,
    map_similarity,
    prepared_values,
    stack_maps,
)
from mapsim.engine.streaming import builder_settings  # noqa: E402
from mapsim.plugins.hooks import HooksExtractor  # noqa: E402


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after two warm-ups."""
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def metrics_step(metrics: list, stack: MapStack, moments: Moments) -> None:
    """Every metric's values on the host from one set of moments: map metrics checked and
    their dead-map rule applied where the moments are (as in the runner's fast path), then
    copied; layer metrics (CKA) from the same moments, one transfer each."""
    for metric in metrics:
        if metric.info.granularity == "layer":
            layer_similarity(metric, stack, moments, "cnn10", "cnn10")
        else:
            dead = metric.dead(moments, 1e-10)
            values, undefined = prepared_values(metric, stack, moments, "cnn10", "cnn10", dead)
            map_similarity(metric, stack, moments, "cnn10", "cnn10", values=values.cpu(),
                           dead=dead.cpu(), undefined=undefined.cpu())


def float64_pearson(z: torch.Tensor) -> torch.Tensor:
    """|r| from a float64 centred product, a pixel stretch at a time (on z's device)."""
    n = z.shape[1]
    mean = z.sum(dim=1, dtype=torch.float64) / n
    g = torch.zeros(z.shape[0], z.shape[0], dtype=torch.float64, device=z.device)
    for start in range(0, n, 65536):
        c = z[:, start:start + 65536].double() - mean[:, None]
        g += c @ c.T
    d = torch.sqrt(torch.diagonal(g))
    return (g / torch.outer(d, d)).abs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a 96 x 128 image, few repeats")
    parser.add_argument("--metrics", default="pearson,cosine,euclidean,cka")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sample-pairs", type=int, default=2000)
    parser.add_argument("--no-sweep", action="store_true", help="skip the layout sweep")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    device = args.device
    height, width = (96, 128) if args.quick else (1104, 1376)
    repeats = 2 if args.quick else args.repeats
    registry = load_registry()
    metrics, missing = [], []
    for name in args.metrics.split(","):
        try:
            metric = registry.create("metric", name, {})
            metric.label = name
            metrics.append(metric)
        except Exception:  # noqa: BLE001 - a metric not installed in this checkout
            missing.append(name)

    arch = registry.create("architecture", "fcn", {"depth": 10, "width": 64, "kernel_size": 7})
    model = build_model("cnn10", architecture=arch, seed=0).module.to(device).eval()
    image = torch.from_numpy(smooth_image(height, width).astype(np.float32))
    image = ((image - image.mean()) / image.std())[None, None].to(device)
    layers = [f"blocks.{i}" for i in range(10)]
    out = HooksExtractor().extract(model, layers, image)
    stack = stack_maps({"cnn10": {p: out[p][0] for p in layers}}, ["cnn10"])
    del out
    z = stack.z
    shape = f"{z.shape[0]} maps x {height}x{width} px"

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    floor = timed(lambda: z @ z.T, device, repeats)

    def stacked(**kw) -> Moments:
        moments = compute_moments(z, **kw)
        metrics_step(metrics, stack, moments)
        return moments

    builder = MomentsBuilder(z.shape[0], z.shape[1], device, **builder_settings(device, None))

    # each layer's maps as the runner's hooks get them: channels-last on a GPU, so a
    # (maps, pixels) view of pixel-major memory
    layer_maps = [z[b.start:b.stop] for b in stack.blocks]
    if device.startswith("cuda"):
        layer_maps = [m.T.contiguous().T for m in layer_maps]

    def fill(b: MomentsBuilder) -> Moments:
        b.reset()
        for maps in layer_maps:
            b.add(maps)
        return b.finish()

    def streamed() -> Moments:
        moments = fill(builder)
        metrics_step(metrics, stack, moments)
        return moments

    t_stacked = timed(stacked, device, repeats)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t_streamed = timed(streamed, device, repeats)
    extra = ""
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        extra = f" (builder memory beyond the maps: {peak:.2f} GiB)"
    t_moments_only = timed(lambda: compute_moments(z), device, repeats)

    ref = float64_pearson(z)

    def pearson_error(moments: Moments) -> float:
        g = moments.comoment
        d = torch.sqrt(torch.diagonal(g))
        r = (g / torch.outer(d, d)).abs()
        live = torch.isfinite(ref) & torch.isfinite(r)
        return float((r - ref)[live].abs().max())

    sweep = []
    quick_configs = [(None, 2048, False), (128, 2048, False)]
    configs = [] if args.no_sweep else quick_configs if args.quick else [
        (rows, chunk, False) for rows in (None, 128, 320) for chunk in (512, 1024, 2048, 4096)
    ] + [(rows, chunk, True) for rows in (None, 128, 320) for chunk in (2048, 8192, 32768)]
    for block_rows, chunk, f64 in configs:
        b = MomentsBuilder(z.shape[0], z.shape[1], device, chunk_pixels=chunk,
                           block_rows=block_rows, float64_products=f64)
        t = timed(lambda: fill(b), device, 3)
        mode = "layer rows in hooks" if block_rows is None else f"{block_rows}-row blocks"
        sweep.append(f"{mode}, chunk {chunk}{', float64 products' if f64 else ''}: "
                     f"{t / floor:.2f}x, |r err| {pearson_error(fill(b)):.1e}")
        del b
    worst = fill(builder).comoment
    d = torch.sqrt(torch.diagonal(worst))
    err = ((worst / torch.outer(d, d)).abs() - ref).abs().nan_to_num(0)
    i, j = divmod(int(err.argmax()), z.shape[0])
    zero = [(z[k] == 0).float().mean().item() for k in (i, j)]
    diag = (f"worst pair ({i}, {j}): |r| {float(ref[i, j]):.4f}, std {float(z[i].std()):.2e} / "
            f"{float(z[j].std()):.2e}, zero pixels {zero[0]:.1%} / {zero[1]:.1%}")
    forward = []
    if device.startswith("cuda"):
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            with torch.inference_mode():
                t = timed(lambda: model(image), device, repeats)
            forward.append(f"cudnn.benchmark {bench}: {t * 1e3:.1f} ms")
        torch.backends.cudnn.benchmark = False
        model.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            t = timed(lambda: model(image), device, repeats)
        forward.append(f"channels_last: {t * 1e3:.1f} ms")
        torch.backends.cudnn.benchmark = True
        with torch.inference_mode():
            t = timed(lambda: model(image), device, repeats)
        forward.append(f"channels_last and cudnn.benchmark: {t * 1e3:.1f} ms")
        torch.backends.cudnn.benchmark = False

    ref = float64_pearson(z)
    every = slice(0, z.shape[0])
    errors = {"stacked": pearson_error(compute_moments(z)),
              "streamed": pearson_error(fill(builder))}

    # the per-pair method on the device, a sample of pairs, extrapolated
    rng = np.random.default_rng(0)
    n = z.shape[0]
    pairs = rng.integers(0, n, size=(args.sample_pairs, 2))
    rows = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i, j in pairs:
        x, y = z[i], z[j]
        zero_a, zero_b = bool(x.std() < 1e-10), bool(y.std() < 1e-10)
        if zero_a or zero_b:
            r = 1.0 if zero_a and zero_b else 0.0
        else:
            r = abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
        rows.append((int(i), int(j), r, zero_a, zero_b))
    per_pair = (time.perf_counter() - start) / len(pairs) * n * n
    err_pair = max(abs(r - float(ref[i, j])) for i, j, r, za, zb in rows if not (za or zb))

    names = ", ".join(m.name for m in metrics) + (f" (not installed: {', '.join(missing)})"
                                                  if missing else "")
    lines = [
        f"{shape}; metrics: {names}",
        f"floor, plain FP32 Z Z^T (TF32 off): {floor * 1e3:.1f} ms",
        f"similarity step, stacked maps: {t_stacked * 1e3:.1f} ms = {t_stacked / floor:.2f}x "
        f"the floor (moments alone {t_moments_only * 1e3:.1f} ms = "
        f"{t_moments_only / floor:.2f}x)",
        f"similarity step, hook path (moments built as the runner does on this device): "
        f"{t_streamed * 1e3:.1f} ms "
        f"= {t_streamed / floor:.2f}x the floor{extra}",
        f"Pearson max |r - float64|: stacked {errors['stacked']:.1e}, layer by layer "
        f"{errors['streamed']:.1e}, per-pair {err_pair:.1e}",
        f"per-pair on the same device: {per_pair:.0f} s for {n * n} pairs (from "
        f"{len(pairs)} sampled pairs) = {per_pair / t_stacked:.0f}x mapsim's step",
    ]
    if sweep:
        lines.append("moments built from the maps, by layout and chunk pixels (x floor, "
                     "Pearson error vs float64): " + "; ".join(sweep))
    lines.append(f"default layout, {diag}")
    if forward:
        lines.append("CNN10 forward pass alone (TF32 convolutions, PyTorch's default): "
                     + "; ".join(forward))
    append("gpu_similarity (CNN10, one image)", device, lines, args.results)


if __name__ == "__main__":
    main()
