"""Saved pruned models: the card, loading in run specs and ``mapsim evaluate``; the summary
tables against hand-worked values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("torch_pruning")

from mapsim.cli import main  # noqa: E402
from mapsim.errors import WeightsError  # noqa: E402
from mapsim.models.build import build_model  # noqa: E402
from mapsim.pruning.summary import answer, summarise  # noqa: E402
from mapsim.registry import load_registry  # noqa: E402

UNET = {"name": "unet", "depth": 1, "width": 4}
DATA = {"name": "synthetic-vessels", "count": 2, "size": [16, 16]}


def unet_spec(tmp_path: Path) -> Path:
    spec = {"name": "unet-prune", "model": {"architecture": UNET},
            "criteria": ["l1", "correlation-compensated"], "sparsity": [0.5],
            "layers": ["encoder.0.1", "decoder.0.0"],
            "calibration": {**DATA, "seed": 1}, "evaluation": {**DATA, "seed": 2},
            "finetune": {"epochs": 1, "data": {**DATA, "seed": 3}}, "seeds": [0],
            "save_models": True}
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    assert main(["prune", str(unet_spec(tmp)), "--out", str(tmp / "out")]) == 0
    return tmp


def test_card_and_files(saved):
    models = sorted((saved / "out" / "models").iterdir())
    assert [m.name for m in models] == ["correlation-compensated-0.5-encoder.0.1_decoder.0.0-s0",
                                        "l1-0.5-encoder.0.1_decoder.0.0-s0"]
    card = json.loads((models[1] / "model.json").read_text())
    assert card["model"]["architecture"]["name"] == "unet"
    assert card["pruned"]["criterion"] == "l1" and card["pruned"]["sparsity"] == 0.5
    assert card["pruned"]["seed"] == 0
    kept = card["pruned"]["layers"]
    assert len(kept["encoder.0.1"]) == 2 and len(kept["decoder.0.0"]) == 2
    widths = card["pruned"]["widths"]
    assert widths["encoder.0.1.conv"]["out_channels"] == 2
    assert widths["decoder.0.0.conv"]["in_channels"] == 4 + 2  # up.0's 4 and the skip's 2
    table = pd.read_csv(saved / "out" / "prune.csv")
    row = table[table.criterion == "l1"].iloc[0]
    assert card["parameters"] == row.parameters and card["macs"] == row.macs
    assert card["metrics"]["pruned"]["iou"] == pytest.approx(row.iou_pruned)
    assert card["metrics"]["finetuned"]["iou"] == pytest.approx(row.iou_finetuned)
    assert card["original"]["parameters"] > card["parameters"]
    assert {"prune.png", "prune.html", "prune_summary.csv", "prune_answer.csv"} <= \
        {p.name for p in (saved / "out").iterdir()}


def test_saved_model_loads_in_a_run_spec_and_evaluate(saved, tmp_path):
    from safetensors.torch import load_file

    folder = saved / "out" / "models" / "l1-0.5-encoder.0.1_decoder.0.0-s0"
    registry = load_registry()
    arch = registry.create("architecture", "unet", {"depth": 1, "width": 4})
    loaded = build_model("p", architecture=arch, weights=folder / "model.safetensors")
    assert loaded.source["weights"]["pruned"] is True
    state = load_file(str(folder / "model.safetensors"))
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, state[key]), key
    card = json.loads((folder / "model.json").read_text())
    assert sum(p.numel() for p in loaded.module.parameters()) == card["parameters"]
    with torch.no_grad():
        assert loaded.module(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)
    # mapsim evaluate reads the card: its IoU on the evaluation images is the card's
    data = json.dumps({**DATA, "seed": 2})
    out = tmp_path / "ev"
    assert main(["evaluate", str(folder / "model.safetensors"), "--data", data, "--out",
                 str(out), "--no-panels", "--quiet", "--device", "cpu"]) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("metric")
    assert summary.loc["iou", "mean"] == pytest.approx(card["metrics"]["finetuned"]["iou"],
                                                       abs=1e-6)


def test_pruned_weights_on_another_network_are_refused(saved):
    folder = saved / "out" / "models" / "l1-0.5-encoder.0.1_decoder.0.0-s0"
    arch = load_registry().create("architecture", "fcn", {"depth": 2, "width": 4})
    with pytest.raises(WeightsError, match="the card names"):
        build_model("p", architecture=arch, weights=folder / "model.safetensors")


def test_summary_and_answer_by_hand():
    rows = []
    for seed, base in ((0, 0.90), (1, 0.92)):
        rows.append(dict(seed=seed, criterion="none", layers="", sparsity=0.0, maps_removed=0,
                         parameters=100, macs=1000, iou_pruned=base, cldice_pruned=1.0,
                         iou_finetuned=np.nan, cldice_finetuned=np.nan))
        for level, drop, tuned in ((0.25, 0.005, 0.0), (0.5, 0.02, 0.008), (0.75, 0.005, 0.03)):
            rows.append(dict(seed=seed, criterion="l1", layers="blocks.0", sparsity=level,
                             maps_removed=int(level * 8), parameters=100 - 40 * level,
                             macs=1000, iou_pruned=0.91 - drop + 0.01 * seed,
                             cldice_pruned=1.0, iou_finetuned=0.91 - tuned, cldice_finetuned=1))
    summary = summarise(pd.DataFrame(rows))
    none = summary[summary.criterion == "none"].iloc[0]
    assert none.iou_pruned == pytest.approx(0.91) and none.seeds == 2
    assert none.iou_pruned_std == pytest.approx(np.std([0.90, 0.92], ddof=1))
    at = summary[(summary.criterion == "l1")].set_index("sparsity")
    assert at.loc[0.5, "iou_drop_pruned"] == pytest.approx(0.91 - (0.91 - 0.02 + 0.005))
    got = answer(summary, 0.01).iloc[0]
    # pruned: 0.25 passes (drop 0.0), 0.5 fails (0.015), 0.75 would pass but comes after
    assert got.sparsity_pruned == 0.25 and got.maps_removed_pruned == 2
    # fine-tuned: 0.25 (0.0) and 0.5 (0.008) pass, 0.75 (0.03) fails
    assert got.sparsity_finetuned == 0.5 and got.parameters_finetuned == 80


def test_answer_reports_the_threshold_rows():
    def row(seed, criterion, sparsity, maps, parameters, iou, tuned):
        return {"seed": seed, "criterion": criterion, "layers": "blocks.0",
                "sparsity": sparsity, "maps_removed": maps, "parameters": parameters,
                "macs": 1000, "iou_pruned": iou, "cldice_pruned": 1.0, "iou_finetuned": tuned,
                "cldice_finetuned": 1.0}

    rows = []
    for seed in (0, 1):
        rows.append({**row(seed, "none", 0.0, 0, 100, 0.90, np.nan), "layers": ""})
        # a level beyond the tolerance, then the threshold (3 maps) within it
        rows.append(row(seed, "correlation-compensated", 0.25, 2, 90, 0.85, 0.88))
        rows.append(row(seed, "correlation-compensated", np.nan, 3, 85, 0.896,
                        0.89 + 0.004 * seed))
        rows.append(row(seed, "l1", 0.25, 2, 90, 0.895, 0.90))  # no threshold rows
        rows.append(row(seed, "correlation", np.nan, 3, 85, 0.70, 0.86))  # threshold only
    got = answer(summarise(pd.DataFrame(rows)), 0.01).set_index("criterion")
    assert list(got.index) == ["correlation-compensated", "l1", "correlation"]
    comp = got.loc["correlation-compensated"]
    # the threshold rows do not count as a level: 0.25 fails, so no sparsity is within it
    assert comp.sparsity_pruned == 0 and comp.maps_removed_pruned == 0
    assert comp.maps_removed_threshold == 3 and comp.parameters_threshold == 85
    assert comp.iou_drop_threshold_pruned == pytest.approx(0.004)
    assert comp.iou_drop_threshold_finetuned == pytest.approx(0.90 - 0.892)  # mean of seeds
    l1 = got.loc["l1"]
    assert l1.sparsity_pruned == 0.25 and l1.iou_drop_finetuned == pytest.approx(0.0)
    assert np.isnan(l1.maps_removed_threshold) and np.isnan(l1.iou_drop_threshold_pruned)
    only = got.loc["correlation"]
    assert only.sparsity_pruned == 0 and only.sparsity_finetuned == 0
    assert only.iou_drop_threshold_pruned == pytest.approx(0.20)
    assert only.iou_drop_threshold_finetuned == pytest.approx(0.04)
    # no pruned rows at all: the columns are still there
    empty = answer(summarise(pd.DataFrame(rows[:1])), 0.01)
    assert len(empty) == 0 and "iou_drop_threshold_finetuned" in empty.columns


NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.a = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.b = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        return self.head(torch.relu(self.b(y)) + y)  # a residual sum couples a and b


def build(width=6):
    return Net(width)
'''


def test_python_model_end_to_end(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    spec = {"name": "py-prune", "model": {"python": "net:build", "kwargs": {"width": 6}},
            "criteria": ["random"], "sparsity": [0.5], "layers": ["a"],
            "calibration": {**DATA, "seed": 1}, "evaluation": {**DATA, "seed": 2},
            "seeds": [3], "save_models": True}
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["prune", str(path), "--out", str(tmp_path / "out")]) == 0
    folder = next((tmp_path / "out" / "models").iterdir())
    card = json.loads((folder / "model.json").read_text())
    assert card["model"]["python"] == "net:build"
    # a's maps are summed with b's: both lose the same 3 channels, and the head's inputs too
    channels = card["pruned"]["channels"]
    assert channels["a"]["out"] == channels["b"]["out"] == channels["head"]["in"]
    assert len(channels["a"]["out"]) == 3
    loaded = build_model("p", python="net:build", kwargs={"width": 6},
                         weights=folder / "model.safetensors", base_dir=tmp_path)
    assert loaded.module.b.out_channels == 3 and loaded.module.bn.num_features == 3
    assert sum(p.numel() for p in loaded.module.parameters()) == card["parameters"]
