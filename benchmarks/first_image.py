"""What the first image of a fresh process costs beyond the others (the layout probe), CPU.

``python benchmarks/first_image.py [--base PATH] [--repeats 3] [--spec examples/study.yaml]``:
`mapsim run examples/quickstart.yaml` (three 256 x 256 images, CNN4 and CNN6; or ``--spec``)
in fresh processes, as a user runs it; each process reports the wall time of its first image's launch (the forward
pass with the moments, and learning the input size's layout first) and of the second, and
the run's total from run.json. With ``--base``, another checkout's ``src`` runs alternately
in the same invocation (e.g. the commit before a change), so the two are compared on the same
machine minutes apart. Appends to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(spec_path: Path) -> None:
    import time

    from mapsim.engine.step import ImageStep
    from mapsim.runner.run import run
    from mapsim.spec.run_spec import load_spec

    seconds: list[float] = []
    launch = ImageStep.launch

    def timed(self, item, index=None):
        start = time.perf_counter()
        try:
            return launch(self, item, index)
        finally:
            seconds.append(time.perf_counter() - start)

    ImageStep.launch = timed
    spec = load_spec(spec_path)
    with tempfile.TemporaryDirectory() as out:
        result = run(spec, out_dir=Path(out) / "run", progress=False,
                     base_dir=spec_path.parent)
    print(json.dumps({"first": seconds[0], "second": seconds[1],
                      "total": result.info["timings_s"]["total"],
                      "dynamo": "torch._dynamo" in sys.modules}))


def one(src: Path, spec_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, __file__, "--child", "--spec", str(spec_path)],
                          env=env, check=True,
                          capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=None, help="another checkout's src")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec_path = args.spec.resolve()
    if args.child:
        child(spec_path)
        return
    from _report import append

    sources = {"this checkout": ROOT / "src"}
    if args.base is not None:
        sources["base"] = args.base.resolve()
    runs: dict[str, list[dict]] = {name: [] for name in sources}
    for _ in range(args.repeats):
        for name, src in sources.items():
            runs[name].append(one(src, spec_path))
    lines = []
    for name, found in runs.items():
        first = statistics.median(r["first"] for r in found)
        second = statistics.median(r["second"] for r in found)
        total = statistics.median(r["total"] for r in found)
        lines.append(f"{name}: {spec_path.name}, median of {len(found)} fresh processes: first image "
                     f"{first:.3f} s, second {second:.3f} s, run total {total:.3f} s; "
                     f"torch._dynamo imported: {sorted({r['dynamo'] for r in found})}")
    append("The first image of a fresh process (CPU)", "cpu", lines, args.results)


if __name__ == "__main__":
    main()
