"""The bundled ``pretrained:unet``: its card (training command, device, wall time, history,
held-out scores), the issue's bar (held-out IoU >= 0.90, clDice >= 0.95), its scores recomputed
from scratch, and the U-Net example against the bundled CNN6."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_pretrained import scores  # IoU and clDice from scratch (numpy + skimage)

from mapsim.cli import main
from mapsim.models.build import (
    file_sha256,
    pretrained_card,
    pretrained_names,
    pretrained_path,
)
from mapsim.registry import load_registry
from mapsim.training import load_train_spec
from mapsim.training.checkpoint import read_document
from mapsim.training.models import load_segmentation_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def images(card, **params):
    data = {k: v for k, v in card["spec"]["data"].items() if k != "name"} | params
    return list(load_registry().create("dataset", "synthetic-vessels", data))


def test_the_card_records_how_it_was_made():
    assert "unet" in pretrained_names()
    card = pretrained_card("unet")
    assert card["model"]["architecture"] == {"name": "unet", "depth": 3, "width": 32,
                                             "upsampling": "bilinear", "in_channels": 1,
                                             "classes": 2}
    # the spec it was trained from is the one in examples/training
    spec = load_train_spec(EXAMPLES / "training" / "unet.yaml")
    assert spec.model_dump(mode="json") == card["spec"]
    assert re.fullmatch(r"mapsim train examples/training/unet\.yaml --out \S+ --overwrite",
                        card["command"]), card["command"]
    assert card["device"] == "cuda (NVIDIA H200)"
    assert card["time"]["wall_seconds"] == pytest.approx(121.3)
    assert card["time"]["training_seconds"] < card["time"]["wall_seconds"]
    # the epoch lines of the console output agree with the per-epoch log
    epochs = [ln for ln in card["training_output"] if ln.startswith("epoch ")]
    assert len(epochs) == len(card["history"]) == card["epochs"] == 60
    for line, row in zip(epochs, card["history"]):
        iou = float(re.search(r"val IoU ([\d.]+)", line).group(1))
        assert iou == pytest.approx(row["val_iou"], abs=6e-5), line
    best = max(card["history"], key=lambda r: r["val_iou"])
    assert best["epoch"] == card["epoch"]
    assert card["training_output"][-2].startswith(f"best epoch {card['epoch']}/60")
    assert card["metrics"]["validation"]["iou"] == pytest.approx(best["val_iou"], abs=1e-6)
    # the weights file carries its own card; the build records its sha256
    inside = read_document(pretrained_path("unet"))
    assert inside["epoch"] == card["epoch"] and inside["spec"] == card["spec"]
    model = load_segmentation_model("pretrained:unet")
    assert model.loaded.source["weights"]["sha256"] == file_sha256(pretrained_path("unet"))
    conv = sum(p.numel() for n, p in model.loaded.module.named_parameters()
               if not n.startswith("head."))
    assert conv == card["parameters"]["conv_modules"]


def test_held_out_scores_meet_the_bar():
    held = pretrained_card("unet")["held_out"]
    assert held["n_images"] == len(held["per_image"]) == 20
    assert held["mean"]["iou"] >= 0.90 and held["mean"]["cldice"] >= 0.95
    per_image = pd.DataFrame(held["per_image"])
    assert per_image.iou.mean() == pytest.approx(held["mean"]["iou"], rel=1e-12)
    assert per_image.cldice.mean() == pytest.approx(held["mean"]["cldice"], rel=1e-12)


def test_scores_recomputed_from_scratch():
    card = pretrained_card("unet")
    module = load_segmentation_model("pretrained:unet").loaded.module
    # the card's held-out images (seed 2026): the first two, image by image
    held = {row["image"]: row for row in card["held_out"]["per_image"]}
    for item in images(card, seed=2026, count=2):
        iou, cldice = scores(module, item)
        assert iou == pytest.approx(held[item.id]["iou"], abs=1e-6), item.id
        assert cldice == pytest.approx(held[item.id]["cldice"], abs=1e-6), item.id
    # images of a seed no evaluation used (31): the bar holds there too
    got = np.array([scores(module, item) for item in images(card, seed=31, count=3)])
    assert got[:, 0].mean() >= 0.90 and got[:, 1].mean() >= 0.95, got


def test_cli_lists_it(capsys):
    assert main(["models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("unet "))
    assert "unet depth=3 width=32" in line and "1,798,784" in line


def test_the_unet_example_runs_against_the_bundled_cnn6(tmp_path):
    import yaml

    from mapsim.runner.run import run
    from mapsim.spec.run_spec import validate_spec

    data = yaml.safe_load((EXAMPLES / "unet.yaml").read_text())
    assert data["models"]["unet"]["weights"] == "pretrained:unet"
    data["images"]["count"] = 1  # one image keeps it short on a CI CPU
    result = run(validate_spec(data), base_dir=tmp_path, out_dir=tmp_path / "o")
    best = pd.read_csv(result.out_dir / "max.csv")
    assert set(best["aligned"]) == {"smaller/area 32x32"}
    assert best.groupby(["model_a", "layer_a"]).map_a.nunique().to_dict() == {
        ("cnn6", "L1"): 64, ("cnn6", "L6"): 64, ("unet", "E0"): 32, ("unet", "E2"): 128,
        ("unet", "B"): 256, ("unet", "D2"): 128, ("unet", "D0"): 32, ("unet-init", "E0"): 32,
        ("unet-init", "B"): 256, ("unet-init", "D0"): 32}
    # what training taught: the trained U-Net's last decoder block has close partners in
    # CNN6's last module, the untrained one's does not come near
    pair = best[(best.model_a == "unet") & (best.model_b == "cnn6") & (best.layer_a == "D0")
                & (best.layer_b == "L6")]
    init = best[(best.model_a == "unet-init") & (best.model_b == "cnn6")
                & (best.layer_a == "D0") & (best.layer_b == "L6")]
    assert pair.value.mean() > init.value.mean() + 0.1
