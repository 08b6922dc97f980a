"""run.json's timings account for the run's wall time: the phases setup, images, merge and
publish partition ``total`` and cover at least 95 % of the measured time of ``run()`` (a check
of bookkeeping with a tolerance, not a speed target)."""

from __future__ import annotations

import json
import time

from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec

PHASES = ("setup", "images", "wait_for_ranks", "merge", "publish")


def test_the_phases_cover_the_wall_time(tmp_path):
    spec = validate_spec({
        "name": "timings",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 3, "width": 8}, "seed": 1},
                   "b": {"architecture": {"name": "fcn", "depth": 2, "width": 6}, "seed": 2}},
        "layers": {"a": ["blocks.*"], "b": ["blocks.*"]},
        "images": {"name": "synthetic-vessels", "count": 10, "size": [64, 64], "seed": 3},
        "comparisons": [["a", "b"], ["a", "a"]],
        "metrics": ["pearson", "cka"],
        "aggregators": ["max", "pivot"],
        "engine": {"block_images": 4},
        "output": {"pairs": True},
        "device": "cpu",
    })
    start = time.perf_counter()
    result = run(spec, out_dir=tmp_path / "out", progress=False)
    wall = time.perf_counter() - start
    timings = json.loads((result.out_dir / "run.json").read_text())["timings_s"]
    phases = sum(timings.get(k, 0.0) for k in PHASES)
    assert timings["wait_for_workers"] <= timings["images"]
    inner = sum(timings.get(k, 0.0) for k in ("forward", "moments", "similarity", "write",
                                               "wait_for_workers"))
    assert inner <= timings["images"] + 1e-3, timings
    assert phases <= timings["total"] + 1e-3, timings
    assert timings["total"] <= wall + 1e-3
    print(f"phases {phases:.3f} s of {wall:.3f} s wall")
    assert phases >= 0.95 * wall, (phases, wall, timings)
