"""Peak host memory of a CPU run against the size of the captured maps.

``python benchmarks/peak_memory.py`` (issue 21, item 6): CNN6 (fcn depth 6, width 64, 7x7),
layers blocks.0, blocks.1, blocks.3, blocks.5 (256 maps), 2 synthetic images per run, at
``--sizes`` (default 512 and 1024 px square), on the fast path (moments built in the forward
hooks) and on the ordinary path (the fast path switched off in the measured process: the maps
are stacked), both with the spatial null off; then with the spatial null on, on the fast path
(``null``: the maps taken back from the moments buffer and shifted) and on the ordinary path
(``plain-null``: how runs with the null went before 2026-12-05); ``--paths probe,fast-bf16``
runs the fast path with a bf16 forward pass with the precision probe on and off (the probe
runs once more, after the images; set ``PYTHONPATH`` to another checkout's ``src`` to measure
its code). Each run is a fresh process; its peak RSS (``ru_maxrss``) less the peak RSS
of the same process after a 64 x 64 run (imports, models, worker pools: the fixed cost) is
divided by the captured maps' float32 bytes (maps x pixels x 4).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

LAYERS = ["blocks.0", "blocks.1", "blocks.3", "blocks.5"]


def spec(size: int, null: bool = False, probe: bool | None = None):
    from mapsim.spec.run_spec import validate_spec

    return validate_spec({
        "name": "peak",
        "models": {"cnn": {"architecture": {"name": "fcn", "depth": 6, "width": 64,
                                            "kernel_size": 7}, "seed": 0}},
        "layers": {"cnn": LAYERS},
        "images": {"name": "synthetic-vessels", "count": 2, "size": [size, size]},
        "comparisons": [["cnn", "cnn"]],
        "metrics": ["pearson"],
        "aggregators": ["max"],
        "statistics": {"spatial_null": null},
        "engine": {} if probe is None else {"precision": "bf16", "precision_probe": probe},
        "device": "cpu",
    })


def child(size: int, path: str) -> dict:
    from mapsim.engine.step import ImageStep
    from mapsim.runner.run import run

    if path.startswith("plain"):  # what a run takes when its metrics or extractors cannot stream
        ImageStep.streamable = property(lambda self: False)

    out = Path(tempfile.mkdtemp())
    null = path.endswith("null")
    probe = {"probe": True, "fast-bf16": False}.get(path)
    run(spec(64, null, probe), out_dir=out / "small", progress=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run(spec(size, null, probe), out_dir=out / "big", progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    maps = 64 * len(LAYERS) * size * size * 4
    return {"size": size, "path": path, "base": base, "peak": peak, "maps": maps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--paths", default="fast,plain,null,plain-null",
                        help="fast, plain, null, plain-null, probe, fast-bf16")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, path = args.child.split(":")
        print(json.dumps(child(int(size), path)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import append

    lines = []
    for size in (int(s) for s in args.sizes.split(",")):
        for path in args.paths.split(","):
            done = subprocess.run([sys.executable, __file__, "--child", f"{size}:{path}"],
                                  check=True, capture_output=True, text=True)
            info = json.loads(done.stdout.strip().splitlines()[-1])
            extra = info["peak"] - info["base"]
            lines.append(f"{size}x{size}, {path} path: captured maps {info['maps'] / 2**20:.0f} "
                         f"MiB; peak RSS {info['peak'] / 2**20:.0f} MiB, {extra / 2**20:.0f} MiB "
                         f"above the 64x64 run = {extra / info['maps']:.2f}x the maps")
            print(lines[-1], flush=True)
    append("Peak host memory against the captured maps (CPU)", "cpu", lines, args.results)


if __name__ == "__main__":
    main()
