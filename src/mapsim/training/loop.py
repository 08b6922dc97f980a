"""The training loop behind ``mapsim train``.

One epoch: the training examples in an order (and with crops and augmentation) drawn from the
seed and the epoch number, cross-entropy on the two output maps, one optimiser step per batch;
then every validation image is segmented whole and scored (IoU, clDice, Dice, ...). The epoch
with the best mean validation IoU is kept as ``best.safetensors`` with its card; after every
epoch ``last.safetensors`` holds what resuming needs, and ``log.csv`` one row per epoch.

Order of the writes at the end of an epoch: best (when improved), then last, then the log.
A kill at any point leaves a consistent folder: resuming repeats at most the unfinished epoch,
which (on the CPU, or on CUDA with deterministic algorithms) gives the same numbers again.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mapsim._version import __version__
from mapsim.errors import MapsimError, OutputError
from mapsim.models.build import LoadedModel, build_model
from mapsim.registry import Registry, load_registry
from mapsim.runner.writer import atomic_write_text
from mapsim.runner.run import resolve_device
from mapsim.training import checkpoint as ckpt
from mapsim.io.splits import split_indices
from mapsim.training.data import Sample, TrainingBatches, epoch_seed, load_samples
from mapsim.training.predict import autocast, check_scores, predict_mask
from mapsim.spec.train_spec import RESUMABLE_CHANGES

#: validation metrics logged per epoch (means over the validation images); best = highest iou
VALIDATION_METRICS = ("iou", "cldice", "dice", "precision", "recall", "accuracy")

#: columns of log.csv, in order
LOG_COLUMNS = ["epoch", "train_loss", *[f"val_{m}" for m in VALIDATION_METRICS], "best",
               "seconds"]

#: called as on_batch(epoch, batch) after each optimiser step (tests use it to interrupt a run)
BatchHook = Callable[[int, int], None]


@dataclass
class TrainResult:
    """What a training run produced.

    :ivar out_dir: the folder with best/last checkpoints, cards and log.csv.
    :ivar best_epoch: the epoch (1-based) whose weights are in best.safetensors.
    :ivar best_metrics: that epoch's validation metrics.
    :ivar history: one dict per epoch (the rows of log.csv).
    :ivar card: the best checkpoint's card.
    """

    out_dir: Path
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)


def output_dir(spec: Any, base_dir: Path, out_dir: str | Path | None) -> Path:
    """The run's folder: ``out_dir``, else the spec's ``output.dir``, else ``runs/<name>``
    (relative paths against ``base_dir``)."""
    chosen = Path(out_dir) if out_dir is not None else Path(spec.output.dir or f"runs/{spec.name}")
    return (chosen if chosen.is_absolute() else Path(base_dir) / chosen).resolve()


def _prepare_folder(folder: Path, resume: bool, overwrite: bool) -> bool:
    """Check the output folder; returns True when there is a checkpoint to resume from."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the output path {folder} exists and is not a folder.")
    ours = [f"{ckpt.BEST}.safetensors", f"{ckpt.BEST}.json", f"{ckpt.LAST}.safetensors",
            f"{ckpt.LAST}.json", ckpt.LOG]
    present = [name for name in ours if (folder / name).exists()]
    has_last = (folder / f"{ckpt.LAST}.safetensors").is_file()
    if resume:
        return has_last
    if present and not overwrite:
        raise OutputError(
            f"the output folder {folder} already holds a training run ({', '.join(present)}). "
            "Pass --resume to continue it, --overwrite to start again, or choose another "
            "folder with --out."
        )
    for name in present:
        (folder / name).unlink()
    return False


def _versions() -> dict[str, str]:
    import safetensors

    return {"mapsim": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "platform": platform.platform()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _make_optimizer(spec: Any, model: nn.Module) -> torch.optim.Optimizer:
    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                               weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def build_training_model(spec: Any, registry: Registry, base_dir: Path) -> LoadedModel:
    """The spec's model, initialised from the spec's seed (or its starting weights)."""
    m = spec.model
    architecture = None
    if m.architecture is not None:
        architecture = registry.create("architecture", m.architecture.name,
                                       m.architecture.model_dump(exclude={"name"}))
    return build_model(spec.name, architecture=architecture, python=m.python, kwargs=m.kwargs,
                       weights=m.weights, seed=spec.seed, base_dir=base_dir)


def conv_module_parameters(model: nn.Module) -> int:
    """Parameters outside a top-level ``head`` (for fcn: the conv modules the study counts)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("head."))


class _Data:
    """Training and validation samples of a spec."""

    def __init__(self, spec: Any, registry: Registry, base_dir: Path) -> None:
        def dataset(choice: Any) -> Any:
            return registry.create("dataset", choice.name, choice.model_dump(exclude={"name"}),
                                   base_dir=base_dir)

        samples = load_samples(dataset(spec.data), spec.normalise, "data")
        if spec.validation is None:
            train_idx, val_idx = split_indices(len(samples), spec.split.validation_fraction,
                                               spec.split.seed)
            self.train = [samples[i] for i in train_idx]
            self.validation = [samples[i] for i in val_idx]
            self.split = "split"
        else:
            self.train = samples
            self.validation = load_samples(dataset(spec.validation), spec.normalise,
                                           "validation")
            self.split = "separate"

    def describe(self) -> dict[str, Any]:
        return {"split": self.split, "train_images": len(self.train),
                "validation_images": len(self.validation),
                "validation_ids": [s.id for s in self.validation]}


def validate(model: nn.Module, samples: list[Sample], device: torch.device, amp: bool,
             label_skeletons: list[np.ndarray] | None = None) -> dict[str, float]:
    """Mean per-image segmentation metrics of ``model`` over ``samples`` (see
    :mod:`mapsim.segmentation`; ``label_skeletons`` may pass the labels' skeletons)."""
    from mapsim.segmentation import SegmentationAccumulator

    model.eval()
    acc = SegmentationAccumulator()
    for i, s in enumerate(samples):
        skeletons = None if label_skeletons is None else [label_skeletons[i]]
        acc.update(predict_mask(model, s.image, device, amp), s.label, ids=s.id,
                   label_skeletons=skeletons)
    return acc.mean()


def _set_determinism(device: torch.device, deterministic: bool) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def train(
    spec: Any,
    *,
    base_dir: str | Path = ".",
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    command: list[str] | None = None,
    registry: Registry | None = None,
    on_batch: BatchHook | None = None,
) -> TrainResult:
    """Train the spec's model; returns the best epoch and the output folder.

    :param spec: a validated training spec (:func:`mapsim.training.load_train_spec`).
    :param base_dir: folder relative paths in the spec are resolved against.
    :param out_dir: output folder (default: the spec's ``output.dir``, else ``runs/<name>``).
    :param resume: continue from ``last.safetensors`` (a fresh start when there is none).
    :param overwrite: start again in a folder that holds an earlier run.
    :param device: overrides the spec's device.
    :param progress: show a progress bar per epoch.
    :param command: the command line recorded in the card (default: ``sys.argv``).
    :param on_batch: called after every optimiser step with (epoch, batch), both 1-based.
    :raises MapsimError: bad data, a model that does not segment, an unusable folder or
        checkpoint.
    """
    base_dir = Path(base_dir)
    registry = registry or load_registry()
    folder = output_dir(spec, base_dir, out_dir)
    can_resume = _prepare_folder(folder, resume, overwrite)
    dev = resolve_device(device or spec.device)
    _set_determinism(dev, spec.deterministic)
    amp = spec.amp and dev.type == "cuda"

    data = _Data(spec, registry, base_dir)
    from mapsim.segmentation import skeleton

    label_skeletons = [skeleton(s.label) for s in data.validation]
    batches = TrainingBatches(data.train, spec.batch_size, spec.crop, spec.augment.flips,
                              spec.augment.rot90, spec.seed)
    loaded = build_training_model(spec, registry, base_dir)
    model = loaded.module.to(dev)
    optimizer = _make_optimizer(spec, model)
    loss_fn = nn.CrossEntropyLoss()

    history: list[dict[str, Any]] = []
    best_iou, best_epoch, best_card = -math.inf, 0, {}
    elapsed = 0.0
    first_epoch = 1
    if can_resume:
        first_epoch, history, best_iou, best_epoch, elapsed = _resume(
            folder, spec, model, optimizer, dev)
        best_card = ckpt.read_card(folder / f"{ckpt.BEST}.safetensors") or {}
    folder.mkdir(parents=True, exist_ok=True)
    command = list(sys.argv if command is None else command)

    base_card = {
        "format": ckpt.CARD_FORMAT,
        "name": spec.name,
        "model": spec.model.model_dump(mode="json"),
        "normalise": spec.normalise,
        "spec": spec.model_dump(mode="json"),
        "spec_sha256": spec.digest(),
        "seed": spec.seed,
        "data": data.describe(),
        "parameters": {"total": sum(p.numel() for p in model.parameters()),
                       "conv_modules": conv_module_parameters(model)},
        "device": _device_name(dev),
        "amp": amp,
        "versions": _versions(),
        "command": shlex.join(command),
        "cwd": os.getcwd(),
    }

    from tqdm.auto import tqdm

    for epoch in range(first_epoch, spec.epochs + 1):
        t0 = time.time()
        torch.manual_seed(epoch_seed(spec.seed + 1, epoch))
        model.train()
        total, count = 0.0, 0
        bar = tqdm(batches.batches(epoch), total=len(batches), disable=not progress,
                   desc=f"epoch {epoch}/{spec.epochs}", leave=False, unit="batch")
        for b, (images, labels) in enumerate(bar, start=1):
            x = torch.from_numpy(images).to(dev, non_blocking=True)
            y = torch.from_numpy(labels).to(dev, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast(dev, amp):
                scores = model(x)
            check_scores(scores, x, f"model of {spec.name!r}")
            loss = loss_fn(scores.float(), y)
            if not torch.isfinite(loss):
                raise MapsimError(
                    f"epoch {epoch}, batch {b}: the loss is {loss.item()}; training diverged. "
                    "Lower optimizer.lr (or switch optimizer), or check the images for "
                    "extreme values."
                )
            loss.backward()
            optimizer.step()
            total += loss.item() * len(images)
            count += len(images)
            bar.set_postfix(loss=f"{total / count:.4f}")
            if on_batch is not None:
                on_batch(epoch, b)
        bar.close()
        metrics = validate(model, data.validation, dev, amp, label_skeletons)
        improved = bool(metrics["iou"] > best_iou)  # False for NaN
        seconds = time.time() - t0
        elapsed += seconds
        row = {"epoch": epoch, "train_loss": total / max(count, 1),
               **{f"val_{k}": metrics[k] for k in VALIDATION_METRICS},
               "best": improved, "seconds": round(seconds, 3)}
        history.append(row)
        if improved:
            best_iou, best_epoch = metrics["iou"], epoch
            best_card = {**base_card, "epoch": epoch, "epochs": spec.epochs,
                         "metrics": {"validation": metrics, "train_loss": row["train_loss"]},
                         "time": {"written": _now(), "training_seconds": round(elapsed, 1)}}
            ckpt.save_best(folder, model, best_card)
        ckpt.save_last(folder, model, optimizer, {
            "epoch": epoch, "spec": spec.model_dump(mode="json"),
            "spec_sha256": spec.digest(ignore=RESUMABLE_CHANGES),
            "best_iou": best_iou, "best_epoch": best_epoch, "history": history,
            "training_seconds": elapsed, "written": _now(),
        })
        _write_log(folder, history)
        if progress:
            mark = " (best)" if improved else ""
            print(f"epoch {epoch}/{spec.epochs}: loss {row['train_loss']:.4f}, val IoU "
                  f"{metrics['iou']:.4f}, clDice {metrics['cldice']:.4f}{mark} "
                  f"[{seconds:.1f} s]", file=sys.stderr)

    if best_epoch == 0:
        raise MapsimError(
            f"no epoch gave a validation IoU (it was undefined in every epoch): check that the "
            f"validation labels of {spec.name!r} mark vessels."
        )
    best_metrics = dict(best_card.get("metrics", {}).get("validation", {}))
    return TrainResult(folder, best_epoch, best_metrics, history, best_card)


def _resume(folder: Path, spec: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
            device: torch.device) -> tuple[int, list[dict[str, Any]], float, int, float]:
    """Load the last checkpoint into ``model`` and ``optimizer``; returns (next epoch,
    history, best IoU, best epoch, training seconds so far)."""
    from mapsim.models.build import apply_weights

    state, optim_state, rng, document = ckpt.load_last(folder)
    if document.get("spec_sha256") != spec.digest(ignore=RESUMABLE_CHANGES):
        raise ckpt.CheckpointError(
            f"the checkpoint in {folder} was written by a different training spec; only "
            f"{', '.join(RESUMABLE_CHANGES)} may change between a run and its resumption. "
            "Use the original spec, or start again with --overwrite (or another --out)."
        )
    apply_weights(model, state, folder / f"{ckpt.LAST}.safetensors")
    model.to(device)
    try:
        optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ckpt.CheckpointError(
            f"the optimiser state in {folder} does not fit ({exc}); start again with "
            "--overwrite."
        ) from exc
    ckpt.restore_rng(rng)
    history = list(document["history"])
    return (int(document["epoch"]) + 1, history, float(document["best_iou"]),
            int(document["best_epoch"]), float(document.get("training_seconds", 0.0)))


def _write_log(folder: Path, history: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(history, columns=LOG_COLUMNS)
    atomic_write_text(folder / ckpt.LOG, frame.to_csv(index=False, float_format="%.6g"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
