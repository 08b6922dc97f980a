"""What the confidence intervals over images cost (issue 15), CPU.

1. The study spec (examples/study.yaml, pictures off) with `statistics.confidence: null`
   against the default 0.95, in one run of this script: wall time of each and the ratio.
2. The interval computation alone on a study-sized summary (1,331 rows) of 30 images at
   9,999 resamples: mapsim's bootstrap against `scipy.stats.bootstrap` called the same way
   (scipy only with --scipy: it takes about 30 s and 3 GB here).
3. The interval computation alone on the summary of a 60-image CNN10 run (3,300 rows, as
   `benchmarks/end_to_end.py` writes it): one thread against the default threads, best of 3
   each, alternating (`--threads-only` skips 1 and 2).

Run: python benchmarks/intervals.py [--scipy]. Appends to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import append  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def study_times(folder: Path, repeats: int = 2) -> dict[object, float]:
    """Best wall time of each setting over ``repeats`` alternating runs, after a warm-up."""
    import mapsim

    times: dict[object, float] = {}
    for round_ in range(repeats + 1):
        for confidence in (None, 0.95):
            spec = mapsim.load_spec(ROOT / "examples" / "study.yaml")
            spec = spec.model_copy(update={"statistics": spec.statistics.model_copy(
                update={"confidence": confidence})})
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mapsim.run(spec, out=folder / str(confidence), overwrite=True,
                           progress=False, plots=False)
            seconds = time.perf_counter() - start
            if round_:  # the first round warms up (imports, caches)
                times[confidence] = min(times.get(confidence, seconds), seconds)
    return times


def threads_line(rows: int = 3300, n: int = 60, repeats: int = 3) -> str:
    import os

    from mapsim.tables.intervals import MAX_WORKERS, bootstrap_intervals

    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"image": np.tile(np.arange(n), rows),
                          "k": np.repeat(np.arange(rows), n), "x": rng.exponential(1, rows * n)})
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    best: dict[int, float] = {}
    tables = {}
    for _ in range(repeats):
        for count in (1, workers):
            start = time.perf_counter()
            tables[count] = bootstrap_intervals(frame, ["k"], 0.95, workers=count)
            seconds = time.perf_counter() - start
            best[count] = min(best.get(count, seconds), seconds)
    same = tables[1].equals(tables[workers])
    return (f"{rows:,} rows x {n} images, 9,999 resamples: 1 thread {best[1]:.3f} s, "
            f"{workers} threads {best[workers]:.3f} s (ratio {best[1] / best[workers]:.2f}x; "
            f"identical intervals: {same}; {os.cpu_count()} CPUs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scipy", action="store_true", help="also time scipy.stats.bootstrap")
    parser.add_argument("--threads-only", action="store_true", help="only part 3")
    parser.add_argument("--results", type=Path, help="append to this file instead")
    args = parser.parse_args()
    from mapsim.tables.intervals import bootstrap_intervals

    if args.threads_only:
        append("confidence intervals over images: threads, CPU", "cpu", [threads_line()],
               args.results)
        return

    with tempfile.TemporaryDirectory() as tmp:
        times = study_times(Path(tmp))
    lines = [f"study spec, 3 images, pictures off, best of 2 after a warm-up: intervals off "
             f"{times[None]:.2f} s, on "
             f"{times[0.95]:.2f} s, ratio {times[0.95] / times[None]:.2f}"]
    rng = np.random.default_rng(0)
    rows, n = 1331, 30
    frame = pd.DataFrame({"image": np.tile(np.arange(n), rows),
                          "k": np.repeat(np.arange(rows), n), "x": rng.exponential(1, rows * n)})
    start = time.perf_counter()
    bootstrap_intervals(frame, ["k"], 0.95)
    ours = time.perf_counter() - start
    line = f"1,331 rows x 30 images, 9,999 resamples: mapsim {ours:.2f} s"
    if args.scipy:
        from scipy import stats

        start = time.perf_counter()
        stats.bootstrap((frame.x.to_numpy().reshape(rows, n),), np.mean, axis=-1,
                        vectorized=True, n_resamples=9999, rng=np.random.default_rng(0))
        theirs = time.perf_counter() - start
        line += f", scipy.stats.bootstrap {theirs:.2f} s (ratio {theirs / ours:.0f}x)"
    lines.append(line)
    lines.append(threads_line())
    append("confidence intervals over images (issue 15), CPU", "cpu", lines, args.results)


if __name__ == "__main__":
    main()
