"""What the spatial null costs (issue 15, chance levels), CPU or GPU.

The study spec (examples/study.yaml, pictures off) with ``statistics.spatial_null: false`` against
``true`` (the default), and ``true`` with the fast path switched off (how runs with the null
went before 2026-12-05), alternating in one run of this script, best of ``--repeats`` after a
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
                ) -> tuple[dict[str, float], float]:
    """Best wall time with the null off, on, and on with the fast path switched off (``plain``:
    how runs with the null went before 2026-12-05), and the null's own seconds (best run)."""
    import mapsim
    from mapsim.engine.step import ImageStep

    streamable = ImageStep.streamable
    times: dict[str, float] = {}
    null_seconds = float("inf")
    for round_ in range(repeats + 1):
        for mode in ("off", "on", "plain"):
            null = mode != "off"
            ImageStep.streamable = property(lambda self: False) if mode == "plain" else streamable
            spec = mapsim.load_spec(ROOT / "examples" / "study.yaml")
            spec = spec.model_copy(update={
                "statistics": spec.statistics.model_copy(update={"spatial_null": null}),
                "images": spec.images.model_copy(update={"count": images}),
                "device": device})
            out = folder / mode
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mapsim.run(spec, out=out, overwrite=True, progress=False, plots=False)
            seconds = time.perf_counter() - start
            ImageStep.streamable = streamable
            if round_:  # the first round warms up (imports, caches)
                times[mode] = min(times.get(mode, seconds), seconds)
                if mode == "on":
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
              f"{args.repeats} after a warm-up: null off {times['off']:.2f} s, on "
              f"{times['on']:.2f} s, ratio {times['on'] / times['off']:.2f} (the null's own "
              f"timing in run.json: {null_seconds:.2f} s); on with the fast path off (as "
              f"before 2026-12-05) {times['plain']:.2f} s, ratio "
              f"{times['plain'] / times['off']:.2f}")]
    append("spatial null: run time on against off (issue 15)", args.device, lines,
           args.results)


if __name__ == "__main__":
    main()
