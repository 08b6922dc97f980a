"""The untrained baseline: what the statistics read before any learning.

With ``statistics.untrained: K`` the run's comparisons are computed again, after the run's
images, on K random initialisations of the same architectures (the weights left out, each
model a seed of its own per initialisation: ``numpy.random.default_rng([statistics.seed,
UNTRAINED_STREAM]).integers(2**31, size=(K, models))``, recorded in run.json). Each
initialisation gives one value per layer pair and statistic: the mean over the run's images
of its per-image ``pivot`` row. ``baselines.csv`` reports their mean and 95th percentile over
the K initialisations (``baseline: untrained``, ``n`` = K).

Only models given by ``architecture`` (the built-in architectures, and so every
``pretrained:`` network) can be rebuilt untrained; a comparison that involves a ``python:`` or
``torchscript`` model is skipped with a warning naming it, and listed in run.json.

It is computed on rank 0 when the results are published, over every image in order, so
blocks, processes and resumed runs give the same rows. It costs about K times the run's
forward passes and products.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mapsim.errors import MapsimWarning
from mapsim.tables.aggregation import PIVOT_KEYS
from mapsim.tables.chance import STATISTICS

#: the second entry of the seed sequence of the initialisations' seeds
UNTRAINED_STREAM = 7919


@dataclass
class UntrainedRows:
    """What the untrained baseline gives: one pivot row per initialisation and layer pair
    (``best_mean``, ``pct_well``: the mean over images), the seeds and the comparisons left
    out."""

    rows: pd.DataFrame
    seeds: list[dict[str, int]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """run.json's record."""
        return {"baseline": "untrained", "inits": len(self.seeds), "seeds": self.seeds,
                "skipped": self.skipped,
                "value": "per initialisation: the mean over the run's images of each pivot "
                         "statistic; baselines.csv: mean and p95 over the initialisations"}


def init_seeds(seed: int, inits: int, models: Sequence[str]) -> list[dict[str, int]]:
    """Each initialisation's seed per model (distinct with overwhelming probability)."""
    drawn = np.random.default_rng([int(seed), UNTRAINED_STREAM]).integers(
        0, 2**31, size=(inits, len(models)))
    return [{m: int(s) for m, s in zip(models, row)} for row in drawn]


def rebuildable(spec: Any, comparisons: Sequence[tuple[str, str]]
                ) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """The comparisons whose models mapsim can rebuild untrained, and those it cannot."""
    kept, skipped = [], []
    for a, b in comparisons:
        bad = [m for m in dict.fromkeys((a, b)) if spec.models[m].architecture is None]
        if bad:
            skipped.append({"comparison": f"{a} -> {b}", "reason": (
                f"model(s) {', '.join(bad)} come from python: or torchscript, which mapsim "
                "cannot rebuild at a random initialisation")})
        else:
            kept.append((a, b))
    return kept, skipped


def untrained_rows(spec: Any, base_dir: Path, device: str, dataset: Any,
                   registry: Any = None) -> UntrainedRows:
    """Run the spec's rebuildable comparisons on ``statistics.untrained`` random
    initialisations over every image of ``dataset``; one pivot row per init and layer pair."""
    from mapsim.runner.setup import RunSetup
    from mapsim.runner.tablework import aggregate_tables

    statistics = spec.statistics
    comparisons, skipped = rebuildable(spec, spec.pairs())
    for item in skipped:
        warnings.warn(f"statistics.untrained: {item['comparison']} is skipped: {item['reason']}",
                      MapsimWarning, stacklevel=2)
    models = list(dict.fromkeys(m for pair in comparisons for m in pair))
    seeds = init_seeds(statistics.seed, statistics.untrained, models)
    frames = []
    for number, chosen in enumerate(seeds):
        if not comparisons:
            break
        untrained = {m: spec.models[m].model_copy(update={"weights": None, "seed": s})
                     for m, s in chosen.items()}
        copy = spec.model_copy(update={
            "models": untrained, "comparisons": [list(p) for p in comparisons],
            "statistics": statistics.model_copy(update={"spatial_null": False, "untrained": 0})})
        setup = RunSetup(copy, base_dir, device, registry)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MapsimWarning)  # seeds differ: no shared start
            setup.prepare_models()
        per_image = []
        for index, item in enumerate(dataset):
            result = setup.step.compute(item, index=index)
            for sim in result.matrices:
                pivot = aggregate_tables(setup.aggregators, sim).get("pivot")
                if pivot is not None and not pivot.empty:
                    per_image.append(pivot)
        if not per_image:
            continue
        frame = pd.concat(per_image, ignore_index=True)
        keys = [*PIVOT_KEYS, "threshold"]
        means = frame.groupby(keys, sort=False, dropna=False)[list(STATISTICS)].mean()
        means = means.reset_index()
        means.insert(0, "image", f"init-{number}")
        frames.append(means)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for key in PIVOT_KEYS:
        if key in rows:
            rows[key] = rows[key].astype(str)
    return UntrainedRows(rows, seeds if comparisons else [], skipped)
