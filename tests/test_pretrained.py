"""The bundled networks: they load, have the study's sizes, and segment held-out images."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from skimage.morphology import skeletonize

from mapsim.cli import main
from mapsim.models.build import file_sha256, pretrained_card, pretrained_names, pretrained_path
from mapsim.registry import load_registry
from mapsim.training.checkpoint import read_document
from mapsim.training.models import load_segmentation_model

#: parameters of the conv modules (head excluded), as the study reports them (7x7, width 64)
CONV_PARAMETERS = {"cnn1": 3_328, "cnn6": 1_007_808, "cnn6-s2": 1_007_808,
                   "cnn10": 1_811_392, "cnn10-s2": 1_811_392}


@pytest.fixture(scope="module")
def held_out():
    """Two 256x256 synthetic images of a seed used neither in training (1) nor validation (2)
    nor in the cards' held-out evaluation (2026), with the training appearance."""
    card = pretrained_card("cnn6")
    params = {k: v for k, v in card["spec"]["data"].items() if k != "name"}
    assert params["seed"] == 1 and card["spec"]["validation"]["seed"] == 2
    params.update(seed=31, count=2, start=0)
    dataset = load_registry().create("dataset", "synthetic-vessels", params)
    return list(dataset)


def scores(module, item):
    """IoU and clDice from scratch (numpy + skimage), independent of mapsim's metrics."""
    with torch.inference_mode():
        out = module(torch.from_numpy(item.image)[None])[0]
    pred = (out[1] > out[0]).numpy()
    label = item.label
    iou = np.sum(pred & label) / np.sum(pred | label)
    sp, sl = skeletonize(pred), skeletonize(label)
    tprec, tsens = np.sum(sp & label) / np.sum(sp), np.sum(sl & pred) / np.sum(sl)
    return iou, 2 * tprec * tsens / (tprec + tsens)


def test_bundled_networks_and_cards():
    assert pretrained_names() == ["cnn1", "cnn10", "cnn10-s2", "cnn6", "cnn6-s2", "unet"]
    for name, expected in CONV_PARAMETERS.items():
        card = pretrained_card(name)
        arch = card["model"]["architecture"]
        assert (arch["name"], arch["width"], arch["kernel_size"]) == ("fcn", 64, 7)
        assert arch["depth"] == int(name[3:].split("-")[0])
        assert card["parameters"]["conv_modules"] == expected
        assert re.fullmatch(rf"mapsim train examples/training/{name}\.yaml --out \S+/{name} "
                            r"--overwrite", card["command"]), card["command"]
        assert card["training_output"][-2].startswith(f"best epoch {card['epoch']}/")
        assert len(card["history"]) == card["epochs"]
        # the weights file carries its own training card in its metadata
        inside = read_document(pretrained_path(name))
        assert inside["epoch"] == card["epoch"] and inside["spec"] == card["spec"]
        model = load_segmentation_model(f"pretrained:{name}")
        conv = sum(p.numel() for n, p in model.loaded.module.named_parameters()
                   if not n.startswith("head."))
        assert conv == expected
        assert model.loaded.source["weights"]["sha256"] == file_sha256(pretrained_path(name))
    # every network started from its own recorded seed: no two share an initialisation
    seeds = {n: pretrained_card(n)["seed"] for n in CONV_PARAMETERS}
    assert len(set(seeds.values())) == len(seeds), seeds
    held = {n: pretrained_card(n)["held_out"]["mean"] for n in CONV_PARAMETERS}
    for name in ("cnn6", "cnn6-s2", "cnn10", "cnn10-s2"):
        assert held[name]["iou"] >= 0.80 and held[name]["cldice"] >= 0.90
        assert held[name]["iou"] > held["cnn1"]["iou"] + 0.1


def test_bundled_networks_segment_held_out_images(held_out):
    results = {}
    for name in CONV_PARAMETERS:
        module = load_segmentation_model(f"pretrained:{name}").loaded.module
        results[name] = np.array([scores(module, item) for item in held_out])
    for name in ("cnn6", "cnn10"):
        iou, cldice = results[name].mean(axis=0)
        assert iou >= 0.80, (name, results[name])
        assert cldice >= 0.90, (name, results[name])
    # CNN1 is clearly worse, as in the study
    assert results["cnn1"][:, 0].mean() < results["cnn6"][:, 0].mean() - 0.05


def test_cli_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:6]] == ["cnn1", "cnn6", "cnn6-s2", "cnn10",
                                                      "cnn10-s2"]
    assert "1,007,808" in out[2]
    assert main(["models", "cnn10"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["architecture"]["depth"] == 10
    assert main(["models", "cnn7"]) == 2
    assert "unknown pretrained weights 'cnn7'" in capsys.readouterr().err


def test_example_specs_are_valid(capsys):
    """examples/study.yaml (the main job) and the specs the bundled networks were trained with."""
    from pathlib import Path

    from mapsim.training import load_train_spec

    examples = Path(__file__).resolve().parents[1] / "examples"
    assert main(["validate", str(examples / "study.yaml"), "--deep"]) == 0
    out = capsys.readouterr().out
    assert "4 model(s), 7 comparison(s)" in out and "15 layer(s) resolved, 3 image(s)" in out
    for name in CONV_PARAMETERS:
        spec = load_train_spec(examples / "training" / f"{name}.yaml")
        assert spec.model_dump(mode="json") == pretrained_card(name)["spec"]
