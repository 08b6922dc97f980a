"""End to end: ``mapsim prune`` on a tiny fcn writes prune.csv and prune.json."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
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


def test_validate_and_schema_cover_prune_specs(tmp_path, capsys):
    assert main(["validate", str(EXAMPLE)]) == 0
    assert "is a valid prune spec: criteria correlation" in capsys.readouterr().out
    assert main(["validate", str(EXAMPLE), "--deep"]) == 0
    assert "layers: blocks.0, blocks.1, blocks.2" in capsys.readouterr().out
    schema_file = tmp_path / "schema.json"
    assert main(["schema", "--kind", "prune", "--out", str(schema_file)]) == 0
    capsys.readouterr()
    schema = json.loads(schema_file.read_text())
    assert {"criteria", "sparsity", "per_layer", "save_models", "finetune"} <= \
        set(schema["properties"])
    import jsonschema
    import yaml

    jsonschema.validate(yaml.safe_load(EXAMPLE.read_text()), schema)
    assert main(["schema"]) == 0
    assert "criteria" not in json.loads(capsys.readouterr().out)["properties"]


BAD = [
    ("[0.25, 0.5]", "[1.0]", "sparsity: sparsity [1.0] outside [0, 1): give "
     "fractions of the maps of each layer, e.g. [0.25, 0.5]"),
    ("criteria: [", "criterion: [", "criterion: unknown field; did you mean 'criteria'?"),
    ("hrank]", "hrnak]", "'hrnak'"),
]


@pytest.mark.parametrize("old, new, message", BAD)
def test_bad_prune_specs_have_pinned_messages(tmp_path, capsys, old, new, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace(old, new, 1))
    assert main(["validate", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "the prune spec is not valid" in err and message in err, err


def test_validate_deep_unknown_layer(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text() + "layers: [blocks.1, block.2]\n")
    assert main(["validate", str(bad)]) == 0  # the fields are fine
    capsys.readouterr()
    assert main(["validate", str(bad), "--deep"]) != 0
    err = capsys.readouterr().err
    assert "layers: 'block.2' is not a prunable layer of the model (did you mean " \
        "'blocks.2'?); the prunable layers are blocks.0, blocks.1, blocks.2" in err
    assert main(["prune", str(bad), "--out", str(tmp_path / "o")]) != 0
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_experiment_script_tiny(tmp_path):
    import importlib.util

    script = EXAMPLE.parent / "pruning" / "run_experiment.py"
    module_spec = importlib.util.spec_from_file_location("run_experiment", script)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "x"), "--tiny", "--device", "cpu",
                        "--networks", "cnn6"]) == 0
    table = pd.read_csv(tmp_path / "x" / "cnn6" / "prune.csv")
    assert set(table.criterion) == {"none", "correlation-compensated", "l1"}
    assert set(table.layers.dropna()) == {"blocks.0", "blocks.1"}
    assert (table[table.criterion != "none"].maps_removed == 16).all()
    assert table[["iou_pruned"]].notna().all().all()
    assert table[table.criterion != "none"].iou_finetuned.notna().all()
    answer = (tmp_path / "x" / "answer.md").read_text()
    assert "| correlation-compensated | blocks.0 |" in answer


def test_prune_specs_in_the_docs_validate(tmp_path):
    """Every ```yaml block of docs/pruning.md whose first line is '# prune spec'."""
    import re

    page = (EXAMPLE.parents[1] / "docs" / "pruning.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", page, re.DOTALL)
              if b.startswith("# prune spec")]
    assert blocks
    for k, block in enumerate(blocks):
        path = tmp_path / f"block-{k}.yaml"
        path.write_text(block)
        assert main(["validate", str(path)]) == 0
    assert yaml_equal(blocks[0], EXAMPLE)


def yaml_equal(block: str, path: Path) -> bool:
    import yaml

    doc, example = yaml.safe_load(block), yaml.safe_load(path.read_text())
    return all(example.get(k) == v for k, v in doc.items() if k != "save_models")
