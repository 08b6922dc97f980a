"""Rank 0, after every block: merge the blocks, write the summaries and run.json, publish."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mapsim._version import __version__
from mapsim.observers import RunObserver
from mapsim.engine.align import describe as describe_align
from mapsim.engine.similarity import MapStack
from mapsim.engine.step import ACROSS_IMAGES, POOLED_IMAGE, DeadCount, DeadKey
from mapsim.runner.blocks import ImageBlock, PartialRun
from mapsim.runner.distributed import World
from mapsim.runner.setup import RunSetup
from mapsim.runner.pairs import PARQUET, is_pairs_table, write_parquet
from mapsim.runner.untrained import UntrainedRows, untrained_rows
from mapsim.runner.sinks import WriterOutput, summary_accumulators, table_sink
from mapsim.runner.writer import ResultsWriter
from mapsim.engine.null import DEFINITION as NULL_DEFINITION, TABLE_PREFIX as NULL_PREFIX
from mapsim.tables.chance import chance_tables
from mapsim.tables.intervals import SEED, bootstrap_intervals, with_intervals


@dataclass
class RunResult:
    """What a run produced."""

    out_dir: Path
    n_images: int
    tables: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def merge_and_publish(setup: RunSetup, world: World, partial: PartialRun,
                      blocks: list[ImageBlock], resumed: set[int], overwrite: bool,
                      started: float, observers: Sequence[RunObserver] = (),
                      probe_on: Any = None) -> RunResult:
    """The results directory, staged in the partial directory and moved into place: the
    blocks' states merged in block order, the pooled and across-image tables, the summaries,
    run.json and what the observers write. ``probe_on``: the dataset whose first image the
    precision probe measures; it is queued first, so that a GPU computes it while the host
    merges, and read for run.json."""
    spec = setup.spec
    start = time.perf_counter()
    if probe_on is not None:
        setup.launch_precision_probe(probe_on)
    writer = ResultsWriter(partial.target, overwrite=overwrite, files=partial.rows)
    try:
        merged = partial.merge(blocks, observers, setup.metrics)
        if spec.engine.pooled:
            layouts = {g: MapStack(torch.empty(layout[-1].stop, 0), layout)
                       for g, layout in merged.layouts.items()}
            pooled = setup.step.pooled(merged.pooled, layouts)
            sink = table_sink(setup.aggregators, spec.output.pairs, WriterOutput(writer), 0,
                              setup.timings).prefixed("pooled/")
            try:
                for name, frame in pooled.frames:
                    sink.frame(name, frame)
                for sim in pooled.matrices:
                    sink.aggregate(pooled.image_id, sim)
            finally:
                sink.close()
        for frame in setup.step.across_images():
            writer.append("layer_similarity", frame)
        from_aggregators = {t for a in setup.aggregators for t in a.summarise}  # always written
        for table, accumulator in summary_accumulators(setup.aggregators).items():
            frame = merged.summaries.get(table, accumulator).table()
            if table in from_aggregators or not frame.empty:
                name = "summary" if table == "pivot" else f"{table}_summary"
                if spec.statistics.confidence is not None:
                    frame = _with_intervals(frame, partial.rows.folder / f"{table}.csv",
                                            accumulator.keys, spec.statistics)
                writer.write_table(name, frame)
        untrained = _write_chance(setup, partial.rows.folder, writer)
        setup.timings["merge"] = time.perf_counter() - start
        start = time.perf_counter()
        if spec.output.pairs == PARQUET:  # the staged chunks become pairs.parquet
            for table in [t for t in writer.files.headers if is_pairs_table(t)]:
                staged = writer.staging / f"{table}.csv"
                write_parquet(staged, staged.with_suffix(".parquet"))
                staged.unlink()
        for observer in observers:
            observer.write(writer.staging)
        tables = writer.tables()
        setup.finish_precision_probe()
        # what is left after this is writing run.json and renaming the staged folder
        setup.timings["publish"] = time.perf_counter() - start
        info = run_info(setup, merged.dead_counts, merged.n_images, time.perf_counter() - started)
        info["untrained"] = None if untrained is None else untrained.record()
        info["blocks"] = {
            "processes": world.size, "backend": world.backend or "none",
            "block_images": spec.engine.block_images, "blocks": len(blocks),
            "resumed_blocks": len(resumed),
            "images_per_rank": {str(r): n for r, n in sorted(merged.images_per_rank.items())},
        }
        writer.write_json("run.json", info)
        out = writer.publish()
    except BaseException:
        writer.discard()
        raise
    partial.remove()
    world.share("finished", str(out))
    return RunResult(out, merged.n_images, tables, info)


def _with_intervals(summary: pd.DataFrame, rows: Path, keys: list[str],
                    statistics: Any) -> pd.DataFrame:
    """The summary with bootstrap intervals from the per-image rows of its table (the rows
    computed across all images, or pooled, are not images and are left out)."""
    if rows.is_file():
        per_image = pd.read_csv(rows, dtype={k: str for k in ("image", *keys)
                                             if k not in ("threshold",)},
                                keep_default_na=False, na_values=[""])
        per_image = per_image[~per_image["image"].isin([ACROSS_IMAGES, POOLED_IMAGE])]
    else:
        per_image = pd.DataFrame(columns=["image", *keys])
    intervals = bootstrap_intervals(per_image, keys, statistics.confidence,
                                    statistics.resamples)
    return with_intervals(summary, intervals, keys)


def _write_chance(setup: RunSetup, rows: Path, writer: ResultsWriter) -> UntrainedRows | None:
    """``baselines.csv`` and ``map_pvalues.csv`` from the per-image rows (and the shifted
    comparisons' rows under ``null/``) of the merged blocks, with the untrained baseline
    when ``statistics.untrained`` asks for it (returned for run.json)."""
    statistics = setup.spec.statistics
    untrained = None
    if statistics.untrained:
        start = time.perf_counter()
        untrained = untrained_rows(setup.spec, setup.base_dir, str(setup.device),
                                   setup.dataset(setup.base_dir), setup.registry)
        setup.timings["untrained"] = time.perf_counter() - start
    if setup.step.null is None and untrained is None:
        return None
    higher = {m.label: m.info.higher_is_more_similar for m in setup.metrics}
    table, pvalues = chance_tables(rows, higher, statistics.flips, statistics.seed,
                                   statistics.fdr, prefix=NULL_PREFIX,
                                   untrained=None if untrained is None else untrained.rows)
    if table is not None:
        writer.write_table("baselines", table)
    if pvalues is not None:
        writer.write_table("map_pvalues", pvalues)
    return untrained


def _null_info(setup: RunSetup, n_images: int) -> dict[str, Any] | None:
    """run.json's record of the spatial null (None when it is off)."""
    if setup.step.null is None:
        return None
    statistics = setup.spec.statistics
    return {
        "baseline": "spatial-null", "definition": NULL_DEFINITION, "seed": statistics.seed,
        "draws": {"per_image_and_comparison": 1, "total_per_comparison": n_images},
        "tables": ["baselines.csv", "map_pvalues.csv", f"{NULL_PREFIX}max.csv",
                   f"{NULL_PREFIX}pivot.csv"],
        "p95": "95th percentile of the per-image null values (numpy linear interpolation); "
               "above: observed mean over images > p95",
        "pvalues": {"test": "paired sign-flip permutation over images of d = observed best "
                            "- null best (one-sided)",
                    "flips": statistics.flips, "fdr": statistics.fdr,
                    "correction": "Benjamini-Hochberg (scipy.stats.false_discovery_control) "
                                  "within each layer pair",
                    "significant": f"q < {statistics.fdr}"},
    }


def run_info(setup: RunSetup, dead_counts: dict[DeadKey, DeadCount], n_images: int,
             seconds: float) -> dict[str, Any]:
    """The contents of run.json."""
    spec = setup.spec
    providers = setup.registry.providers()
    used = {
        "metrics": {m.name: providers["metric"][m.name] for m in setup.metrics},
        "aggregators": {a.name: providers["aggregator"][a.name] for a in setup.aggregators},
        "datasets": {spec.images.name: providers["dataset"][spec.images.name]},
        "extractors": {
            m.extractor.name: providers["extractor"][m.extractor.name]
            for m in setup.models.values()
        },
        "architectures": {
            s.architecture.name: providers["architecture"][s.architecture.name]
            for n, s in spec.models.items() if s.architecture is not None and n in setup.models
        },
    }
    return {
        "mapsim_version": __version__,
        "spec": spec.model_dump(mode="json"),
        "spec_sha256": spec.digest(),
        "n_images": n_images,
        "comparisons": [list(p) for p in setup.comparisons],
        "models": {
            name: {"source": m.loaded.source, "layers": m.layers,
                   "parameters": m.parameters,
                   "batchnorm_folded": m.fused}
            for name, m in setup.models.items()
        },
        "shared_start": [finding.record() for finding in setup.shared_start],
        "metrics": [m.describe() | {"label": m.label} for m in setup.metrics],
        "aggregators": [
            {"name": a.name, "params": a.params.model_dump(mode="json"),
             "added_as_requirement": a.name in setup.added_aggregators}
            for a in setup.aggregators
        ],
        "plugins_used": used,
        "plugins_registered": providers,
        "device": str(setup.device),
        "precision": {
            "forward": spec.engine.precision,
            "forward_probe": setup.precision_probe,
            "activations": "float32 (autocast outputs converted)",
            "products": "float32 chunks over pixels, TF32 disabled",
            "accumulation": "float64",
            "merge_across_images": "float64, Chan et al. update",
        },
        "intervals": None if spec.statistics.confidence is None else {
            "level": spec.statistics.confidence,
            "method": "bootstrap over images (scipy.stats.bootstrap): BCa from 10 images on "
                      "where defined, else percentile; the value itself when all images "
                      "agree",
            "resamples": spec.statistics.resamples, "seed": SEED,
            "columns": ["ci_low", "ci_high", "ci_method"],
        },
        "null": _null_info(setup, n_images),
        "pooled": {
            "enabled": spec.engine.pooled,
            "metrics": [m.label for m in setup.metrics if m.uses_moments],
            "left_out": [m.label for m in setup.metrics if not m.uses_moments],
            "note": "pooled tables are computed from moments merged over all images; metrics "
                    "without a moments path are left out",
        },
        "align": None if spec.engine.align is None else {
            **describe_align(spec.engine.align),
            "sizes": [{"models": list(models), "sizes": [list(x) for x in sorted(sizes)]}
                      for models, sizes in setup.step.aligned_sizes.items()],
            "note": "sizes: the grids the maps were compared on (this process's images); "
                    "every table row names its own in the 'aligned' column",
        },
        "dead_maps": {
            "policy": spec.engine.dead_maps,
            "dead_std": spec.engine.dead_std,
            "counts": [
                {"metric": k.metric, "model": k.model, "layer": k.layer, "dead_total": v.dead,
                 "images": v.images}
                for k, v in dead_counts.items()
            ],
        },
        "timings_s": {**{k: round(v, 4) for k, v in setup.timings.items()},
                      "total": round(seconds, 4)},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "pandas": pd.__version__,
        },
    }
