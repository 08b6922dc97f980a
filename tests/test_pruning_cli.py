"""End to end: ``mapsim prune`` on a tiny fcn writes prune.csv and prune.json."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from mapsim.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prune.yaml"


def fcn_params(widths, kernel=3, classes=2):
    total, c_in = 0, 1
    for w in widths:
        total += c_in * w * kernel * kernel + 3 * w
        c_in = w
    return total + c_in * classes + classes


def test_prune_example_end_to_end(tmp_path):
    assert main(["prune", str(EXAMPLE), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "prune.csv")
    record = json.loads((tmp_path / "out" / "prune.json").read_text())
    at = table[table.sparsity == 0.5]
    assert set(at.criterion) == {"correlation", "correlation-compensated", "l1", "bn-gamma",
                                 "random", "hrank"}
    assert (at.maps_removed == 12).all()  # 4 of 8 maps in each of 3 layers
    assert (at.parameters == fcn_params([4, 4, 4])).all()
    assert (table[table.criterion == "none"].parameters == fcn_params([8, 8, 8])).all()
    pruned = table[table.criterion != "none"]
    assert pruned[["iou_pruned", "iou_finetuned"]].notna().all().all()
    run = record["runs"][0]
    assert all(len(v) == 8 - round(run["sparsity"] * 8) for v in run["kept"].values())


def test_bad_sparsity_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("[0.25, 0.5]", "[1.5]"))
    assert main(["prune", str(bad), "--out", str(tmp_path / "o")]) != 0
    assert "outside [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
