"""A separately installed distribution becomes a usable metric with no change to mapsim.

The example plugin ``examples/plugins/mapsim-spearman`` is pip-installed into a private folder
(never into this environment); subprocesses that put that folder on ``PYTHONPATH`` see it
through the ``mapsim`` entry-point group, and a plain interpreter does not.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats

from mapsim.models.build import build_model
from mapsim.registry import load_registry
from mapsim.plugins.files import FilesDataset
from mapsim.plugins.hooks import HooksExtractor

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "plugins" / "mapsim-spearman"
DATA = ROOT / "examples" / "data"
IMAGE = DATA / "vessels-1.png"
FCN = {"name": "fcn", "depth": 2, "width": 8}


def _run(args: list[str], env: dict[str, str], cwd: Path | None = None):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def _plain_env() -> dict[str, str]:
    """This environment as it is (an existing PYTHONPATH is kept: mapsim's needs may be there)."""
    return dict(os.environ)


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """An environment whose PYTHONPATH holds a pip-installed copy of mapsim-spearman."""
    work = tmp_path_factory.mktemp("mapsim_spearman")
    source = work / "source"  # pip builds in the tree: build from a copy, not from the repo
    shutil.copytree(PLUGIN, source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__",
                                                  ".pytest_cache"))
    target = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
           "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"pip could not install {PLUGIN}:\n{_explain(exc)}", pytrace=False)
    assert any(target.glob("mapsim_spearman-0.1.0.dist-info")), sorted(target.iterdir())
    env = _plain_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return env


def _spec(tmp_path: Path, metrics: list) -> Path:
    data = {
        "name": "third-party",
        "models": {"m": {"architecture": FCN, "seed": 0}},
        "layers": {"m": ["blocks.0", "blocks.1"]},
        "images": {"name": "files", "paths": [str(IMAGE)]},
        "comparisons": [["m", "m"]],
        "metrics": metrics,
        "aggregators": ["max"],
        "engine": {"pooled": False},
        "device": "cpu",
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plugins_command_lists_the_installed_metric(plugin_env):
    proc = _run(["-m", "mapsim", "plugins"], plugin_env)
    assert proc.returncode == 0, _explain(proc)
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["metric", "spearman", "mapsim-spearman", "0.1.0", "spearman"] in rows, proc.stdout
    assert ["metric", "pearson", "mapsim", "0.1.0", "pearson"] in rows, proc.stdout


def _activations() -> dict[str, np.ndarray]:
    """The spec's maps, recomputed in this process: {layer: (C, P) float64}."""
    registry = load_registry()
    params = {k: v for k, v in FCN.items() if k != "name"}
    model = build_model("m", architecture=registry.create("architecture", "fcn", params), seed=0)
    dataset = FilesDataset(FilesDataset.Params(paths=[str(IMAGE)]), base_dir=DATA)
    (item,) = list(dataset)
    inputs = torch.from_numpy(np.ascontiguousarray(item.image))[None]
    maps = HooksExtractor().extract(model.module, ["blocks.0", "blocks.1"], inputs)
    return {layer: t[0].reshape(t.shape[1], -1).double().numpy() for layer, t in maps.items()}


def test_run_uses_the_installed_metric(plugin_env, tmp_path):
    out = tmp_path / "out"
    spec = _spec(tmp_path, ["pearson", "spearman"])
    proc = _run(["-m", "mapsim", "run", str(spec), "--out", str(out), "--quiet"], plugin_env)
    assert proc.returncode == 0, _explain(proc)

    best = pd.read_csv(out / "max.csv")
    assert set(best["metric"]) == {"pearson", "spearman"}
    spear = best[best["metric"] == "spearman"]
    assert len(spear) == 8 * 2 * 2  # 8 maps of 2 layers, against each of 2 layers
    provider = json.loads((out / "run.json").read_text())["plugins_used"]["metrics"]["spearman"]
    assert provider["distribution"] == "mapsim-spearman"
    assert provider["version"] == "0.1.0"

    # map 0 of blocks.0 against its best partner in blocks.0, recomputed with scipy
    row = spear[(spear["layer_a"] == "blocks.0") & (spear["map_a"] == 0)
                & (spear["layer_b"] == "blocks.0")].iloc[0]
    maps = _activations()["blocks.0"]
    assert maps[0].std() > 0, "map 0 of blocks.0 is dead; choose another map for this check"
    expected = {j: abs(stats.spearmanr(maps[0], maps[j]).statistic)
                for j in range(1, len(maps)) if maps[j].std() > 0}
    partner = int(row["map_b"])
    assert row["value"] == pytest.approx(expected[partner], abs=1e-5)
    assert row["value"] == pytest.approx(max(expected.values()), abs=1e-5)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_without_the_plugin_the_metric_is_unknown(tmp_path, command):
    try:
        md.distribution("mapsim-spearman")
    except md.PackageNotFoundError:
        pass
    else:
        pytest.skip("mapsim-spearman is installed in this environment itself")
    spec = _spec(tmp_path, ["spearman"])
    args = ["-m", "mapsim", command, str(spec)]
    if command == "run":
        args += ["--out", str(tmp_path / "out"), "--quiet"]
    proc = _run(args, _plain_env())
    assert proc.returncode == 2, _explain(proc)
    assert "unknown metric 'spearman'" in proc.stderr
    assert f"Registered metrics: {', '.join(load_registry().names('metric'))}" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_plugins_own_tests_pass(plugin_env):
    proc = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGIN / "tests")],
                plugin_env, cwd=ROOT)
    assert proc.returncode == 0, _explain(proc)
    assert " passed" in proc.stdout and "failed" not in proc.stdout
