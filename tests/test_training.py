"""mapsim train: spec validation, split and batches, checkpoints, resume after a kill."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from scipy import ndimage

from mapsim.cli import main
from mapsim.errors import ImageError, OutputError, SpecError
from mapsim.models.build import build_model, load_state_dict_file
from mapsim.registry import load_registry
from mapsim.training import checkpoint as ckpt
from mapsim.training import load_train_spec, train, validate_train_spec
from mapsim.training.data import Sample, TrainingBatches, split_indices


def make_data(folder, count=10, size=24, seed=0):
    """Blob images (label + noise) with their labels as .npy files."""
    rng = np.random.RandomState(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i in range(count):
        label = ndimage.gaussian_filter(rng.randn(size, size), 2) > 0.1
        image = label + 0.5 * rng.randn(size, size)
        np.save(folder / "images" / f"im{i}.npy", image.astype(np.float32))
        np.save(folder / "labels" / f"im{i}.npy", label)


def tiny_spec(**changes):
    data = {
        "name": "tiny",
        "model": {"architecture": {"name": "fcn", "depth": 2, "width": 4, "kernel_size": 3}},
        "data": {"name": "files", "paths": "d/images", "labels": "d/labels"},
        "epochs": 3,
        "batch_size": 2,
        "crop": 16,
        "augment": {"flips": True, "rot90": True},
        "device": "cpu",  # the determinism checks are made on the CPU, also on a GPU machine
    }
    data.update(changes)
    return validate_train_spec(data)


@pytest.fixture()
def workdir(tmp_path):
    make_data(tmp_path / "d")
    return tmp_path


# --------------------------------------------------------------------------- spec
def test_spec_defaults_follow_the_study():
    spec = tiny_spec()
    assert spec.optimizer.lr == 0.01 and spec.optimizer.name == "sgd"
    assert spec.split.validation_fraction == 0.2
    assert spec.crop == (16, 16)
    fresh = validate_train_spec({"model": {"architecture": {"name": "fcn", "depth": 1}},
                                 "data": {"name": "files", "paths": "x"}})
    assert fresh.epochs == 250 and not fresh.augment.flips and not fresh.augment.rot90
    assert fresh.normalise == "zscore" and fresh.loss == "cross-entropy"


@pytest.mark.parametrize("changes, expected", [
    ({"epoch": 3}, "epoch: unknown field; did you mean 'epochs'?"),
    ({"optimizer": {"lr": -1}}, "optimizer.lr: Input should be greater than 0"),
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name: Input should be 'sgd', 'adam'"),
    ({"model": {"architecture": {"name": "fcn", "depth": 2, "kernel_size": 4}}},
     "model.architecture.kernel_size: kernel_size must be odd"),
    ({"model": {"architecture": {"name": "fnc", "depth": 2}}}, "Closest: fcn"),
    ({"crop": [0, 8]}, "crop: sizes must be >= 1"),
    ({"split": {"validation_fraction": 1.5}}, "split.validation_fraction: Input should be less"),
])
def test_spec_errors_name_the_field(changes, expected):
    with pytest.raises(SpecError) as info:
        tiny_spec(**changes)
    assert expected in str(info.value)
    assert "the training spec is not valid" in str(info.value)


def test_spec_file_formats_agree(tmp_path):
    import yaml

    data = {"model": {"architecture": {"name": "fcn", "depth": 1}},
            "data": {"name": "files", "paths": "x"}, "epochs": 5, "crop": [8, 12]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "s.json").write_text(json.dumps(data))
    (tmp_path / "s.toml").write_text(
        'epochs = 5\ncrop = [8, 12]\n[model.architecture]\nname = "fcn"\ndepth = 1\n'
        '[data]\nname = "files"\npaths = "x"\n')
    specs = [load_train_spec(tmp_path / f"s.{k}") for k in ("yaml", "json", "toml")]
    assert specs[0] == specs[1] == specs[2]


# --------------------------------------------------------------------------- data
def test_split_is_fixed_disjoint_and_80_20():
    train_a, val_a = split_indices(10, 0.2, seed=3)
    train_b, val_b = split_indices(10, 0.2, seed=3)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 2 and sorted(train_a + val_a) == list(range(10))
    # the permutation is numpy's legacy RandomState stream, stable across numpy versions
    assert val_a == sorted(np.random.RandomState(3).permutation(10)[:2].tolist())
    assert split_indices(10, 0.2, seed=4) != (train_a, val_a)
    with pytest.raises(SpecError, match="at least two"):
        split_indices(1, 0.2, 0)


def test_batches_are_reproducible_and_augment_image_and_label_alike():
    rng = np.random.RandomState(0)
    samples = []
    for i in range(5):
        label = rng.rand(12, 12) > 0.5
        samples.append(Sample(str(i), label[None].astype(np.float32) * 2.0, label))
    batches = TrainingBatches(samples, batch_size=2, crop=(8, 8), flips=True, rot90=True, seed=7)
    assert len(batches) == 3
    first = list(batches.batches(epoch=4))
    again = list(batches.batches(epoch=4))
    for (xa, ya), (xb, yb) in zip(first, again):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert [d.index for d in batches.draws(4)] != [d.index for d in batches.draws(5)]
    draws = [d for e in range(1, 30) for d in batches.draws(e)]
    assert {d.rot90 for d in draws} == {0, 1, 2, 3}
    assert any(d.flip_h for d in draws) and any(d.flip_v for d in draws)
    for epoch in range(1, 6):
        for images, labels in batches.batches(epoch):
            assert images.shape[1:] == (1, 8, 8) and labels.dtype == np.int64
            assert np.array_equal(images[:, 0] / 2.0, labels)  # same transform for both
    # start= skips whole batches of the same epoch
    assert np.array_equal(next(batches.batches(4, start=1))[0], first[1][0])


def test_batches_reject_unbatchable_sizes():
    a = Sample("a", np.zeros((1, 8, 8), np.float32), np.zeros((8, 8), bool))
    b = Sample("b", np.zeros((1, 8, 10), np.float32), np.zeros((8, 10), bool))
    with pytest.raises(SpecError, match="differ in size"):
        TrainingBatches([a, b], 2, None, False, False, 0)
    with pytest.raises(SpecError, match="larger than image 'a'"):
        TrainingBatches([a, b], 2, (9, 9), False, False, 0)
    # non-square crops only turn by half turns
    half = TrainingBatches([a, b], 2, (4, 6), False, True, 0)
    assert {d.rot90 for e in range(20) for d in half.draws(e)} == {0, 2}


def test_images_without_labels_are_refused(workdir):
    spec = tiny_spec(data={"name": "files", "paths": "d/images"})
    with pytest.raises(ImageError, match="has no label"):
        train(spec, base_dir=workdir, progress=False)


# --------------------------------------------------------------------------- checkpoints
def test_training_writes_cards_checkpoints_and_log(workdir):
    spec = tiny_spec(epochs=2, optimizer={"name": "adam", "lr": 0.01})
    result = train(spec, base_dir=workdir, progress=False, command=["mapsim", "train", "x.yaml"])
    out = workdir / "runs" / "tiny"
    assert result.out_dir == out
    assert sorted(p.name for p in out.iterdir()) == [
        "best.json", "best.safetensors", "last.json", "last.safetensors", "log.csv"]
    card = json.loads((out / "best.json").read_text())
    assert card == ckpt.read_document(out / "best.safetensors")  # the same card inside
    assert card["epoch"] == result.best_epoch and card["seed"] == 0
    assert card["command"] == "mapsim train x.yaml"
    assert card["spec"]["optimizer"]["name"] == "adam"
    assert card["data"]["train_images"] == 8 and card["data"]["validation_images"] == 2
    assert {"mapsim", "torch", "numpy", "python"} <= set(card["versions"])
    assert card["device"].startswith("cpu")
    log = pd.read_csv(out / "log.csv")
    assert list(log.epoch) == [1, 2]
    # log.csv holds 6 significant digits ("%.6g"), the card the full float64 value (JSON
    # round-trips floats exactly). Rounding x = m * 10**e (1 <= m < 10) to 6 significant digits
    # moves it by at most 0.5 * 10**(e - 5), i.e. a relative 5e-6 / m <= 5e-6: so compare at
    # rel=5e-6 (pytest.approx's default 1e-6 is tighter than the text can hold, and passed by
    # luck), and exactly after formatting the card's value the way the log does.
    iou = card["metrics"]["validation"]["iou"]
    assert log.val_iou[log.epoch == card["epoch"]].item() == pytest.approx(iou, rel=5e-6, abs=0)
    text = pd.read_csv(out / "log.csv", dtype=str)
    assert text.val_iou[text.epoch == str(card["epoch"])].item() == f"{iou:.6g}"
    assert log.val_iou.max() == float(f"{iou:.6g}")

    # best.safetensors is a plain state dict: usable as weights in any spec
    registry = load_registry()
    arch = registry.create("architecture", "fcn", {"depth": 2, "width": 4, "kernel_size": 3})
    model = build_model("m", architecture=arch, weights=out / "best.safetensors")
    assert model.source["weights"]["source"] == "file"

    # last: model, optimizer (Adam moments) and RNG state, all tensors in safetensors
    tensors = load_file(str(out / "last.safetensors"))
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg_sq") for k in tensors)
    assert "rng.cpu" in tensors
    state, optim, rng, document = ckpt.load_last(out)
    assert document["epoch"] == 2 and len(document["history"]) == 2
    assert optim["param_groups"][0]["lr"] == 0.01
    fresh = torch.optim.Adam(torch.nn.Linear(1, 1).parameters())  # shape-free check of keys
    assert set(optim) == set(fresh.state_dict())
    assert set(state) == set(load_state_dict_file(out / "best.safetensors"))


def test_output_folder_is_protected(workdir):
    spec = tiny_spec(epochs=1)
    train(spec, base_dir=workdir, progress=False)
    with pytest.raises(OutputError, match="--resume to continue it, --overwrite"):
        train(spec, base_dir=workdir, progress=False)
    train(spec, base_dir=workdir, progress=False, overwrite=True)
    changed = tiny_spec(epochs=1, optimizer={"lr": 0.05})
    with pytest.raises(ckpt.CheckpointError, match="different training spec"):
        train(changed, base_dir=workdir, progress=False, resume=True)
    # epochs may be raised: the run continues where it stopped
    more = train(tiny_spec(epochs=2), base_dir=workdir, progress=False, resume=True)
    assert [r["epoch"] for r in more.history] == [1, 2]


class Killed(Exception):
    pass


def test_resume_after_a_kill_mid_epoch_gives_the_same_best_checkpoint(workdir):
    """Kill in epoch 3 of 4 (after its second step), resume: same best weights, same log."""
    spec = tiny_spec(epochs=4)
    whole = train(spec, base_dir=workdir, out_dir="whole", progress=False)

    def kill(epoch, batch):
        if (epoch, batch) == (3, 2):
            raise Killed

    with pytest.raises(Killed):
        train(spec, base_dir=workdir, out_dir="cut", progress=False, on_batch=kill)
    cut = workdir / "cut"
    assert ckpt.load_last(cut)[3]["epoch"] == 2  # the last finished epoch
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG state
    np.random.seed(54321)
    resumed = train(spec, base_dir=workdir, out_dir="cut", progress=False, resume=True)

    assert resumed.best_epoch == whole.best_epoch
    a = load_file(str(workdir / "whole" / "best.safetensors"))
    b = load_file(str(cut / "best.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    last_a = load_file(str(workdir / "whole" / "last.safetensors"))
    last_b = load_file(str(cut / "last.safetensors"))
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    # both logs are written by the same code from the same (deterministic, CPU) values, so
    # their text must be identical, not merely close; "seconds" is wall time and differs
    drop = ["seconds"]
    log_a = pd.read_csv(workdir / "whole" / "log.csv", dtype=str).drop(columns=drop)
    log_b = pd.read_csv(cut / "log.csv", dtype=str).drop(columns=drop)
    pd.testing.assert_frame_equal(log_a, log_b, check_exact=True)
    assert resumed.best_metrics == whole.best_metrics


def test_training_lowers_the_loss(workdir):
    """A few epochs of the study's optimiser (SGD, lr 0.01) on the tiny blob set: the last
    epoch's mean training loss is clearly below the first's (a loop that does not learn, e.g.
    a missing optimizer.step() or zero_grad(), fails this)."""
    result = train(tiny_spec(epochs=5), base_dir=workdir, progress=False)
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    logged = pd.read_csv(workdir / "runs" / "tiny" / "log.csv")
    assert logged.train_loss.tolist() == [float(f"{v:.6g}") for v in losses]


# --------------------------------------------------------------------------- command line
def test_cli_train_and_resume(workdir, capsys):
    spec = workdir / "tiny.yaml"
    spec.write_text(
        "name: cli\n"
        "model: {architecture: {name: fcn, depth: 1, width: 4, kernel_size: 3}}\n"
        "data: {name: files, paths: d/images, labels: d/labels}\n"
        "epochs: 1\nbatch_size: 4\n")
    assert main(["train", str(spec), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "best epoch 1/1: validation IoU" in out
    card = json.loads((workdir / "runs" / "cli" / "best.json").read_text())
    assert card["command"] == f"mapsim train {spec} --quiet"
    assert main(["train", str(spec), "--quiet"]) == 2
    assert "--resume to continue" in capsys.readouterr().err
    spec.write_text(spec.read_text().replace("epochs: 1", "epochs: 2"))
    assert main(["train", str(spec), "--quiet", "--resume"]) == 0
    assert "best epoch" in capsys.readouterr().out
    assert len(pd.read_csv(workdir / "runs" / "cli" / "log.csv")) == 2
    spec.write_text(spec.read_text() + "batchsize: 3\n")
    assert main(["train", str(spec)]) == 2
    assert "batchsize: unknown field; did you mean 'batch_size'?" in capsys.readouterr().err


def test_models_must_output_two_maps(workdir):
    from mapsim.errors import ModelError

    spec = tiny_spec(model={"architecture": {"name": "fcn", "depth": 1, "width": 2,
                                             "kernel_size": 3, "classes": 3}})
    with pytest.raises(ModelError, match=r"\(N, 2, H, W\).*classes: 2"):
        train(spec, base_dir=workdir, progress=False)


def test_divergence_is_reported(workdir):
    from mapsim.errors import MapsimError

    spec = tiny_spec(epochs=5, optimizer={"name": "sgd", "lr": 1e30})
    with pytest.raises(MapsimError, match="training diverged. Lower optimizer.lr"):
        train(spec, base_dir=workdir, progress=False)
