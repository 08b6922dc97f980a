"""Chance levels in whole runs (issue 15, item 3): the same tables from one process, a
killed-then-resumed run and torchrun with two CPU processes; the switches; the untrained
baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from files_spec import BROKEN_PNG, FILES_SPEC

import mapsim
from mapsim.errors import MapsimWarning

CHANCE_FILES = ("baselines.csv", "map_pvalues.csv", "null/max.csv", "null/pivot.csv",
                "summary.csv", "max.csv")
#: 8 image files in blocks of 2, with the threshold (pct_well) and 8 images (p-values
#: can go below 0.05)
SPEC = FILES_SPEC | {"metrics": ["pearson"], "aggregators": ["max", "threshold", "pivot"]}


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _images(tmp_path: Path) -> None:
    from mapsim.cli import main

    assert main(["data", "synth", "--count", "8", "--size", "48", "56",
                 "--out", str(tmp_path / "imgs"), "--quiet"]) == 0


def _run(tmp_path: Path, spec: dict, out: str, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MapsimWarning)
        mapsim.run(mapsim.load_spec(spec), base_dir=tmp_path, out=tmp_path / out,
                   progress=False, **kw)
    return tmp_path / out


def _files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in CHANCE_FILES}


def test_a_killed_then_resumed_run_gives_the_chance_tables_of_one_run(tmp_path):
    _images(tmp_path)
    whole = _run(tmp_path, SPEC, "whole")
    broken = tmp_path / "imgs" / "synthetic-s0-i0005.png"  # block 2
    good = broken.read_bytes()
    broken.write_bytes(BROKEN_PNG)
    with pytest.raises(mapsim.MapsimError, match="synthetic-s0-i0005"):
        _run(tmp_path, SPEC, "resumed")
    assert (tmp_path / ".resumed.partial").is_dir()
    broken.write_bytes(good)
    resumed = _run(tmp_path, SPEC, "resumed", resume=True)
    info = json.loads((resumed / "run.json").read_text())
    assert info["blocks"]["resumed_blocks"] == 2
    assert _files(resumed) == _files(whole)
    table = pd.read_csv(whole / "baselines.csv")
    summary = pd.read_csv(whole / "summary.csv")
    # every layer pair of the summary has both statistics against the null
    pairs = summary[summary.statistic.isin(["best_mean", "pct_well"])]
    assert len(table) == len(pairs) and set(table.baseline) == {"spatial-null"}
    merged = table.merge(pairs, on=["metric", "model_a", "layer_a", "model_b", "layer_b",
                                    "threshold", "statistic"])
    np.testing.assert_allclose(merged["observed"], merged["mean_y"], rtol=1e-12)
    assert (merged["n"] == 8).all()
    pvalues = pd.read_csv(whole / "map_pvalues.csv")
    assert pvalues["p"].between(1 / 256, 1).all()  # 8 images: all 256 sign vectors
    null = info["null"]
    assert null["seed"] == 0 and null["draws"]["total_per_comparison"] == 8
    assert "circular shift" in null["definition"] and null["pvalues"]["fdr"] == 0.05


def test_the_null_can_be_turned_off_and_the_untrained_baseline_on(tmp_path):
    _images(tmp_path)
    off = _run(tmp_path, SPEC | {"statistics": {"spatial_null": False}}, "off")
    assert not (off / "baselines.csv").exists() and not (off / "null").exists()
    assert not (off / "map_pvalues.csv").exists()
    info = json.loads((off / "run.json").read_text())
    assert info["null"] is None and info["untrained"] is None

    spec = SPEC | {"statistics": {"spatial_null": False, "untrained": 2}}
    out = _run(tmp_path, spec, "untrained")
    record = json.loads((out / "run.json").read_text())["untrained"]
    seeds = record["seeds"]
    assert len(seeds) == 2 and set(seeds[0]) == {"a", "b"}
    drawn = [s for init in seeds for s in init.values()]
    assert len(set(drawn)) == 4  # distinct seeds, recorded
    table = pd.read_csv(out / "baselines.csv")
    assert set(table.baseline) == {"untrained"} and (table["n"] == 2).all()
    # one initialisation again, by hand: its mean over images is one of the two draws
    first = {m: SPEC["models"][m] | {"seed": s} for m, s in seeds[0].items()}
    by_hand = _run(tmp_path, SPEC | {"models": first, "statistics": {"spatial_null": False}},
                   "by-hand")
    pivot = pd.read_csv(by_hand / "summary.csv")
    row = table[(table.model_a == "a") & (table.layer_a == "blocks.0") & (table.model_b == "b")
                & (table.layer_b == "blocks.1") & (table.statistic == "best_mean")].iloc[0]
    want = pivot[(pivot.model_a == "a") & (pivot.layer_a == "blocks.0") & (pivot.model_b == "b")
                 & (pivot.layer_b == "blocks.1") & (pivot.statistic == "best_mean")]["mean"]
    second = 2 * row["mean"] - float(want.iloc[0])  # the other draw
    # (the by-hand run streams, the baseline takes the plain path: float32 rounding apart)
    np.testing.assert_allclose(row["p95"], np.percentile([float(want.iloc[0]), second], 95),
                               atol=1e-6)
    assert min(float(want.iloc[0]), second) <= row["p95"] <= max(float(want.iloc[0]), second)


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo")
def test_two_processes_give_the_chance_tables_of_one(tmp_path):
    _images(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for command in (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     "-m", "mapsim", "run", "spec.yaml", "--out", "multi", "--quiet"],
                    ["-m", "mapsim", "run", "spec.yaml", "--out", "single", "--quiet"]):
        done = subprocess.run([sys.executable, *command], check=False, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
    assert _files(tmp_path / "multi") == _files(tmp_path / "single")
    info = json.loads((tmp_path / "multi" / "run.json").read_text())
    assert info["blocks"]["processes"] == 2
