"""What the spatial null costs (issue 15, chance levels), CPU or GPU.

The study spec (examples/study.yaml, pictures off) with ``statistics.spatial_null: false`` against
``true`` (the default), alternating in one run of this script, best of ``--repeats`` after a
warm-up round: wall time of each and the ratio, and the run's own ``null`` timing (the shifted
cross products and their matrices). ``--images N`` sets the number of images.

Run: python benchmarks/chance.py [--images 3] [--repeats 2] [--device cpu].
Appends to benchmarks/RESULTS.md (with the command).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import append

ROOT = Path(__file__).resolve().parents[1]


def study_times(folder: Path, images: int, repeats: int, device: str
                ) -> tuple[dict[bool, float], float]:
    """Best wall time with the null off and on, and the null's own seconds (best run)."""
    import mapsim

    times: dict[bool, float] = {}
    null_seconds = float("inf")
    for round_ in range(repeats + 1):
        for null in (False, True):
            spec = mapsim.load_spec(ROOT / "examples" / "study.yaml")
            spec = spec.model_copy(update={
                "statistics": spec.statistics.model_copy(update={"spatial_null": null}),
                "images": spec.images.model_copy(update={"count": images}),
                "device": device})
            out = folder / str(null)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mapsim.run(spec, out=out, overwrite=True, progress=False, plots=False)
            seconds = time.perf_counter() - start
            if round_:  # the first round warms up (imports, caches)
                times[null] = min(times.get(null, seconds), seconds)
                if null:
                    info = json.loads((out / "run.json").read_text())
                    null_seconds = min(null_seconds, info["timings_s"].get("null", 0.0))
    return times, null_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, help="append to this file instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times, null_seconds = study_times(Path(tmp), args.images, args.repeats, args.device)
    lines = [(f"study spec, {args.images} images, pictures off, {args.device}, best of "
              f"{args.repeats} after a warm-up: null off {times[False]:.2f} s, on "
              f"{times[True]:.2f} s, ratio {times[True] / times[False]:.2f} (the null's own "
              f"timing in run.json: {null_seconds:.2f} s)")]
    append("spatial null: run time on against off (issue 15)", args.device, lines,
           args.results)


if __name__ == "__main__":
    main()
