"""mapsim evaluate: per-image and mean metrics against independent references, panels, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.io import imread
from skimage.morphology import skeletonize

from mapsim.cli import main
from mapsim.errors import ImageError, MapsimError, ModelError
from mapsim.io.images import normalise
from mapsim.registry import load_registry
from mapsim.training import train, validate_train_spec
from mapsim.training.evaluate import evaluate, prediction_rgb
from mapsim.training.models import load_segmentation_model
from test_training import make_data

MODEL = "{architecture: {name: fcn, depth: 2, width: 4, kernel_size: 3}, seed: 3}"


@pytest.fixture()
def workdir(tmp_path):
    make_data(tmp_path / "d", count=4, size=20, seed=1)
    return tmp_path


def files_dataset(workdir, labels=True):
    params = {"paths": "d/images"}
    if labels:
        params["labels"] = "d/labels"
    return load_registry().create("dataset", "files", params, base_dir=workdir)


def reference_scores(module, image_path, label_path):
    """IoU, Dice and clDice computed here from scratch in float64 numpy."""
    image = normalise(np.load(image_path)[None], "zscore")
    with torch.no_grad():
        scores = module(torch.from_numpy(image)[None])[0].double().numpy()
    pred = scores[1] > scores[0]
    label = np.load(label_path).astype(bool)
    tp = np.sum(pred & label)
    fp, fn = np.sum(pred & ~label), np.sum(~pred & label)
    sp, sl = skeletonize(pred), skeletonize(label)
    tprec = np.sum(sp & label) / np.sum(sp)
    tsens = np.sum(sl & pred) / np.sum(sl)
    return {"iou": tp / (tp + fp + fn), "dice": 2 * tp / (2 * tp + fp + fn),
            "cldice": 2 * tprec * tsens / (tprec + tsens), "tp": tp}


def test_evaluate_matches_independent_references(workdir):
    model = load_segmentation_model(f"net={MODEL}")
    assert model.name == "net" and model.card is None and model.normalise == "zscore"
    result = evaluate([model], files_dataset(workdir), workdir / "res", progress=False)
    per_image = pd.read_csv(workdir / "res" / "per_image.csv")
    assert list(per_image.image) == ["im0", "im1", "im2", "im3"]
    for _, row in per_image.iterrows():
        ref = reference_scores(model.loaded.module, workdir / "d" / "images" / f"{row.image}.npy",
                               workdir / "d" / "labels" / f"{row.image}.npy")
        assert row.tp == ref["tp"]
        for key in ("iou", "dice", "cldice"):
            assert row[key] == pytest.approx(ref[key], abs=1e-12)
    summary = pd.read_csv(workdir / "res" / "summary.csv")
    iou = summary[summary.metric == "iou"].iloc[0]
    assert iou["mean"] == pytest.approx(per_image.iou.mean())
    assert iou["std"] == pytest.approx(np.std(per_image.iou, ddof=1))
    pooled_iou = per_image.tp.sum() / (per_image.tp + per_image.fp + per_image.fn).sum()
    assert iou["pooled"] == pytest.approx(pooled_iou)
    assert result.out_dir == (workdir / "res").resolve()
    panels = sorted((workdir / "res" / "panels" / "net").iterdir())
    assert [p.name for p in panels] == ["im0.png", "im1.png", "im2.png", "im3.png"]
    assert imread(panels[0]).ndim == 3
    info = json.loads((workdir / "res" / "evaluation.json").read_text())
    assert info["n_images"] == 4 and info["data"] is None


def test_prediction_colours():
    pred = np.array([[1, 1, 0, 0]], bool)
    label = np.array([[1, 0, 1, 0]], bool)
    rgb = prediction_rgb(pred, label)
    assert rgb[0, 0].tolist() == [1, 1, 1]  # TP white
    assert rgb[0, 1, 0] > 0.8 and rgb[0, 1, 2] < 0.2  # FP red
    assert rgb[0, 2, 2] > 0.8 and rgb[0, 2, 0] < 0.3  # FN blue
    assert rgb[0, 3].tolist() == [0, 0, 0]  # TN black


def test_trained_checkpoint_is_found_by_its_card(workdir):
    spec = validate_train_spec({
        "name": "blob", "epochs": 1, "batch_size": 3,
        "model": {"architecture": {"name": "fcn", "depth": 1, "width": 3, "kernel_size": 3}},
        "data": {"name": "files", "paths": "d/images", "labels": "d/labels"},
        "normalise": "minmax"})
    train(spec, base_dir=workdir, progress=False)
    model = load_segmentation_model(str(workdir / "runs" / "blob" / "best.safetensors"))
    assert model.name == "blob" and model.normalise == "minmax"
    assert model.card["epoch"] == 1
    result = evaluate([model], files_dataset(workdir), workdir / "res", progress=False,
                      panels=False)
    row = result.models.iloc[0]
    assert row.depth == 1 and row.best_epoch == 1 and row.batch_size == 3
    assert row.conv_module_parameters == 1 * 3 * 9 + 3 + 2 * 3  # conv + bias + bn
    assert not (workdir / "res" / "panels").exists()
    with pytest.raises(ModelError, match="has no card"):
        (workdir / "runs" / "blob" / "best.json").unlink()
        (workdir / "w.pt").write_bytes(b"")
        load_segmentation_model(str(workdir / "w.pt"))


def test_errors_leave_no_results(workdir):
    three = load_segmentation_model(
        "{architecture: {name: fcn, depth: 1, width: 2, kernel_size: 3, classes: 3}}")
    with pytest.raises(ModelError, match=r"needs \(N, 2, H, W\)"):
        evaluate([three], files_dataset(workdir), workdir / "res", progress=False)
    with pytest.raises(ImageError, match="has no label"):
        evaluate([load_segmentation_model(MODEL)], files_dataset(workdir, labels=False),
                 workdir / "res", progress=False)
    a, b = load_segmentation_model(MODEL), load_segmentation_model(MODEL)
    with pytest.raises(MapsimError, match="two models are named 'model'"):
        evaluate([a, b], files_dataset(workdir), workdir / "res", progress=False)
    assert not (workdir / "res").exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".res")]


def test_cli_evaluate(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    data = "{name: files, paths: d/images, labels: d/labels}"
    assert main(["evaluate", f"a={MODEL}", f"b={MODEL}", "--data", data, "--out", "ev",
                 "--quiet", "--no-panels"]) == 0
    out = capsys.readouterr().out
    assert "2 model(s) on 4 image(s)" in out and "iou" in out
    per_image = pd.read_csv(workdir / "ev" / "per_image.csv")
    assert set(per_image.model) == {"a", "b"}
    a, b = per_image[per_image.model == "a"], per_image[per_image.model == "b"]
    assert np.array_equal(a.iou.to_numpy(), b.iou.to_numpy())  # same seed, same model
    assert main(["evaluate", MODEL, "--data", data, "--out", "ev"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["evaluate", "pretrained:nope", "--data", data]) == 2
    assert "unknown pretrained weights 'nope'" in capsys.readouterr().err


def test_cli_evaluate_data_must_be_a_dataset(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["evaluate", MODEL, "--data", "d/images"]) == 2
    assert "neither a dataset file nor inline YAML" in capsys.readouterr().err
    assert main(["evaluate", MODEL, "--data", "{name: nope}"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("data, kind, n", [
    ("{name: folder, images: d/images, labels: d/labels}", "FolderDataset", 4),
    ("{name: files, paths: d/images, labels: d/labels}", "FilesDataset", 4),
    ("{name: synthetic-vessels, count: 3, size: [24, 24], seed: 9}", "SyntheticVessels", 3),
    ("{models: {}, images: {name: folder, images: d/images, labels: d/labels}}",
     "FolderDataset", 4),  # a run spec's images entry
    ("{model: {}, data: {name: folder, images: d/images, labels: d/labels}}",
     "FolderDataset", 4),  # a training spec's data entry
])
def test_inline_datasets_of_every_form_are_read_as_datasets(workdir, monkeypatch, data, kind,
                                                            n):
    """A dataset's own field called `images` (folder) is not a run spec's `images`."""
    from mapsim.training.commands import _dataset_from

    monkeypatch.chdir(workdir)
    dataset, described, _ = _dataset_from(data)
    assert type(dataset).__name__ == kind and len(dataset) == n
    if kind != "SyntheticVessels":
        assert all(item.label is not None for item in dataset)


def test_every_registered_dataset_has_an_inline_form_here():
    names = set(load_registry().names("dataset"))
    assert names <= {"folder", "files", "synthetic-vessels"}, (
        f"add the inline --data form of {sorted(names - {'folder', 'files', 'synthetic-vessels'})}"
        " to test_inline_datasets_of_every_form_are_read_as_datasets")
