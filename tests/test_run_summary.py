"""The summary `mapsim run` prints: a short files list, and findings for every comparison
(between models too), checked against means computed here from pivot.csv."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from mapsim.cli import main

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("summary")
    spec = {
        "name": "inter-only",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 1},
                   "b": {"architecture": {"name": "fcn", "depth": 3, "width": 3}, "seed": 2}},
        "layers": {"a": {"A1": "blocks.0", "A2": "blocks.1"},
                   "b": {"B1": "blocks.0", "B2": "blocks.1", "B3": "blocks.2"}},
        "images": {"name": "files", "paths": [str(DATA / "vessels-1.png"),
                                              str(DATA / "vessels-2.png")]},
        "comparisons": [["a", "b"]],  # no comparison within a model
        "aggregators": ["max", {"name": "threshold", "value": 0.5}, "pivot"],
        "output": {"plots": True},
    }
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp / "out"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    return out, buffer.getvalue()


def test_files_are_a_short_list(printed) -> None:
    out, text = printed
    assert "pivot.csv" in text and "run.json" in text
    n_pictures = len(list((out / "plots").iterdir()))
    assert f"plots/ ({n_pictures} files)" in text
    long = [line for line in text.splitlines() if len(line.replace(str(out), "OUT")) > 100]
    assert not long, f"lines too long to read: {long}"
    assert ".png" not in text  # pictures are counted, not listed


def test_run_line_gives_analysis_and_drawing_time(printed) -> None:
    out, text = printed
    timings = json.loads((out / "run.json").read_text())["timings_s"]
    first = text.splitlines()[0]
    assert f"analysis {timings['total']:.1f} s" in first
    assert f"pictures {timings['draw']:.1f} s" in first


def test_findings_of_a_run_with_only_inter_comparisons(printed) -> None:
    out, text = printed
    pivot = pd.read_csv(out / "pivot.csv")
    means = pivot.groupby(["model_a", "layer_a", "model_b", "layer_b"])[
        ["best_mean", "pct_well"]].mean()
    rows = re.findall(r"^  pearson\s+(\S+ → \S+)\s+(\S+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)$",
                      text, re.M)
    expected = []
    for a, b in (("a", "b"), ("b", "a")):
        for layer in sorted(pivot[pivot.model_a == a].layer_a.unique()):
            part = means.loc[(a, layer, b)]
            partner = part.best_mean.idxmax()
            expected.append((f"{a} → {b}", layer, partner,
                             f"{part.best_mean[partner]:.3f}", f"{part.pct_well[partner]:.1f}"))
    assert sorted(rows) == sorted(expected)
