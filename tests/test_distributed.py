"""``torchrun -m mapsim run``: two CPU processes (gloo) against one process, and a failing rank
followed by --resume. Each test starts torchrun in a subprocess (about 15 s each here)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed
import yaml
from files_spec import BROKEN_PNG, FILES_SPEC

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed with gloo, which torchrun runs need",
)


#: every table there is: two comparison groups, metrics with and without a moments path,
#: debiased CKA (per-layer pixel statistics), CKA across images (taken in block by block),
#: per-metric thresholds, pooled tables; 7 images in
#: blocks of 2, so the last block is short
FULL_SPEC = {
    "name": "dd",
    "models": {"a": {"architecture": {"name": "fcn", "depth": 3, "width": 8}, "seed": 1},
               "b": {"architecture": {"name": "fcn", "depth": 2, "width": 8}, "seed": 2}},
    "layers": {"a": "blocks.*", "b": "blocks.*"},
    "images": {"name": "synthetic-vessels", "count": 7, "size": [48, 56]},
    "comparisons": [["a", "a"], ["a", "b"]],
    "metrics": ["pearson", "cosine", {"name": "euclidean"}, {"name": "cka", "debiased": True},
                # across images, in batches of 4 that straddle the blocks and the ranks
                {"name": "cka", "samples": "images", "size": 2, "batch_size": 4,
                 "label": "cka_images"}],
    "aggregators": ["max", "min", {"name": "threshold", "per_metric": {"euclidean": 1.5}},
                    "pivot"],
    "engine": {"pooled": True, "block_images": 2},
    "device": "cpu",
}

#: 8 image files in blocks of 2: rank 0 does blocks 0 and 1, rank 1 blocks 2 and 3
RESUME_SPEC = FILES_SPEC | {"metrics": ["pearson", {"name": "cka", "debiased": True}]}


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """What runs in this process (making images) is one process, whatever launched pytest."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def clean_env(gpus: bool) -> dict[str, str]:
    """This environment without torchrun's variables, with one CPU thread (as torchrun gives
    each process) and NVLink multicast off; GPUs hidden unless ``gpus``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                        "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env |= {"OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0"}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def torchrun(cwd: Path, *args: str, processes: int = 2,
             gpus: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m mapsim run ARGS`` in ``cwd`` (GPUs
    hidden unless ``gpus``)."""
    env = clean_env(gpus)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(processes), "-m", "mapsim", "run", *args, "--quiet"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def one_process(spec_path: Path, out: Path) -> Path:
    """The same spec run by ``mapsim run`` alone (the reference), with the environment the
    torchrun processes get: one CPU thread, as torchrun gives each process. (Convolutions on
    the CPU round differently with other thread counts: about 3e-7 with 16 threads.)"""
    env = clean_env(gpus=False)
    done = subprocess.run([sys.executable, "-m", "mapsim", "run", str(spec_path), "--out",
                           str(out), "--quiet"], cwd=spec_path.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def explain_csv_difference(name: str, got: bytes, want: bytes) -> str:
    """Why two CSV files differ: the first differing line, and whether they are equal as
    numbers (np.allclose) despite the bytes."""
    got_lines, want_lines = got.decode().splitlines(), want.decode().splitlines()
    first = next((i for i, (a, b) in enumerate(zip(got_lines, want_lines)) if a != b),
                 min(len(got_lines), len(want_lines)))
    text = (f"{name} differs from the one-process run ({len(got_lines)} vs {len(want_lines)} "
            f"lines); first difference at line {first + 1}:\n"
            f"  torchrun: {got_lines[first] if first < len(got_lines) else '<none>'}\n"
            f"  one:      {want_lines[first] if first < len(want_lines) else '<none>'}")
    try:
        a, b = pd.read_csv(io.BytesIO(got)), pd.read_csv(io.BytesIO(want))
        same_shape = a.shape == b.shape and list(a.columns) == list(b.columns)
        if same_shape:
            numeric = a.select_dtypes("number").columns
            close = np.allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float),
                                rtol=1e-9, atol=1e-12, equal_nan=True)
            others = a.drop(columns=numeric).equals(b.drop(columns=numeric))
            text += f"\n  numerically close: {close}; non-numeric columns equal: {others}"
        else:
            text += f"\n  shapes differ: {a.shape} vs {b.shape}"
    except Exception as exc:  # noqa: BLE001 - only for the message
        text += f"\n  (could not compare as tables: {exc})"
    return text


def assert_same_results(got_dir: Path, want_dir: Path) -> dict[str, bytes]:
    got, want = files(got_dir), files(want_dir)
    assert sorted(got) == sorted(want)
    csvs = [name for name in want if name.endswith(".csv")]
    assert len(csvs) >= 5
    for name in csvs:
        assert got[name] == want[name], explain_csv_difference(name, got[name], want[name])
    return got


def run_info(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_two_processes_give_the_results_of_one(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(FULL_SPEC))

    done = torchrun(tmp_path, "spec.yaml", "--out", "multi")
    assert done.returncode == 0, done.stderr[-4000:]
    # rank 0 alone writes and reports
    assert len(re.findall(r"^7 image\(s\) on cpu .*; results in", done.stdout, re.M)) == 1, \
        done.stdout
    assert "mapsim: error" not in done.stderr

    single = one_process(spec_path, tmp_path / "single")
    got = assert_same_results(tmp_path / "multi", single)
    assert {"pooled/max.csv", "pooled/layer_similarity.csv", "summary.csv", "max.csv",
            "layer_similarity_summary.csv", "dead_maps.csv"} <= set(got)
    layer = pd.read_csv(tmp_path / "multi" / "layer_similarity.csv")
    across = layer[layer.image == "all-images"]
    assert set(across.metric) == {"cka_images"} and len(across) == 3 * 3 + 3 * 2
    assert across.value.notna().all()

    blocks = run_info(tmp_path / "multi")["blocks"]
    assert blocks["processes"] == 2 and blocks["backend"] == "gloo"
    assert (blocks["block_images"], blocks["blocks"], blocks["resumed_blocks"]) == (2, 4, 0)
    per_rank = blocks["images_per_rank"]
    assert set(per_rank) == {"0", "1"} and all(n > 0 for n in per_rank.values())
    assert sum(per_rank.values()) == 7
    assert run_info(single)["blocks"]["processes"] == 1
    # everything else in run.json (but timings) is the one process's
    multi_info, single_info = run_info(tmp_path / "multi"), run_info(single)
    for info in (multi_info, single_info):
        info.pop("timings_s"), info.pop("blocks")
    assert multi_info == single_info
    # no partial folder (nor staging folder) left beside the results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single", "spec.yaml"]


def test_a_failing_rank_stops_the_run_and_resume_completes_it(tmp_path):
    from mapsim.cli import main

    assert main(["data", "synth", "--count", "8", "--size", "48", "56",
                 "--out", str(tmp_path / "imgs"), "--quiet"]) == 0
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(RESUME_SPEC))
    # image 6 is in block 3, rank 1's second block
    broken = tmp_path / "imgs" / "synthetic-s0-i0006.png"
    good = broken.read_bytes()
    broken.write_bytes(BROKEN_PNG)

    failed = torchrun(tmp_path, "spec.yaml", "--out", "multi")
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("mapsim: error:")]
    known_race = ("\n(rank 0 said 'process 1 stopped' instead of rank 1's error: rank 1 sends its "
                  "'abort' to rank 0's inbox before it stores its error for the others, see "
                  "runner._run_blocks and run)"
                  if any("process 1 stopped" in line for line in errors) else "")
    assert any(line.startswith("mapsim: error: process 1 of 2 failed: ")
               and "synthetic-s0-i0006.png" in line for line in errors), \
        failed.stderr[-4000:] + known_race
    # mapsim reports its error in one line; a traceback there would show frames of mapsim's
    # files (torchrun's launcher prints its own traceback, which has none)
    assert not re.search(r'File "[^"]*[/\\]mapsim[/\\]', failed.stderr), failed.stderr[-4000:]
    assert not (tmp_path / "multi").exists()
    partial = tmp_path / ".multi.partial"
    assert partial.is_dir()
    done = {int(p.name) for p in (partial / "blocks").iterdir()}
    # Rank 1 finishes block 2 and sends it to rank 0 before it reports its failure (the send
    # returns once rank 0 takes it), so block 2 is always kept; block 3 never is. Rank 0's
    # blocks 0 and 1 race the failure in principle (rank 0 stops at its next image once the
    # failure is reported), though here rank 0 always finished both: see the report.
    assert 2 in done and done <= {0, 1, 2}, done
    note = [line for line in failed.stderr.splitlines() if "finished block(s)" in line]
    assert note and f"the {len(done)} finished block(s) of this run are kept in" in note[0]
    assert "--resume" in note[0]

    broken.write_bytes(good)
    resumed = torchrun(tmp_path, "spec.yaml", "--out", "multi", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert not partial.exists()
    single = one_process(spec_path, tmp_path / "single")
    assert_same_results(tmp_path / "multi", single)
    blocks = run_info(tmp_path / "multi")["blocks"]
    assert blocks["resumed_blocks"] == len(done)
    assert (blocks["processes"], blocks["backend"], blocks["blocks"]) == (2, "gloo", 4)
    assert sum(blocks["images_per_rank"].values()) == 8
    assert run_info(tmp_path / "multi")["n_images"] == 8


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.distributed.is_nccl_available()),
                    reason="needs a GPU and NCCL")
def test_on_a_gpu_torchrun_joins_nccl_and_blocks_match_the_cpu(tmp_path):
    """One process per GPU (here one): the NCCL group is joined, and the GPU fast path's block
    states (pooled moments copied to the host without waiting) give the CPU's tables."""
    spec = FULL_SPEC | {"metrics": ["pearson", "cosine", {"name": "euclidean"}],
                        "device": "cuda"}
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(spec | {"device": "cpu"}))
    done = torchrun(tmp_path, "gpu.yaml", "--out", "gpu", processes=1, gpus=True)
    assert done.returncode == 0, done.stderr[-4000:]
    blocks = run_info(tmp_path / "gpu")["blocks"]
    assert (blocks["processes"], blocks["backend"], blocks["blocks"]) == (1, "nccl", 4)
    assert run_info(tmp_path / "gpu")["device"] == "cuda:0"
    cpu = one_process(tmp_path / "cpu.yaml", tmp_path / "cpu")
    gpu, want = files(tmp_path / "gpu"), files(cpu)
    assert sorted(gpu) == sorted(want)
    for name in [n for n in want if n.endswith(".csv")]:
        a, b = pd.read_csv(io.BytesIO(gpu[name])), pd.read_csv(io.BytesIO(want[name]))
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        numeric = [c for c in a.select_dtypes("number").columns
                   if c not in ("map_b",)]  # a best partner may flip between near ties
        np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float),
                                   rtol=1e-4, atol=1e-4, equal_nan=True, err_msg=name)
