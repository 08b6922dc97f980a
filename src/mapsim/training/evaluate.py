"""``mapsim evaluate``: segmentation quality of one or more models on a labelled data set.

Writes, into a results folder that appears whole or not at all (staged, then renamed):

- ``per_image.csv``: one row per model and image: accuracy, precision, recall, F1, Dice, IoU,
  Tprec, Tsens, clDice and the pixel counts (the study's Table 5, with every metric);
- ``summary.csv``: per model and metric, the mean and sample std over images (the study's
  Table 4 figures) and the pooled value (all images' counts summed);
- ``models.csv``: per model, its parameters and, from its card, how it was trained (depth,
  batch size, best epoch, validation IoU and clDice, training time);
- ``panels/<model>/<image>.png``: image, label, and the prediction with true positives
  white, false positives red and false negatives blue;
- ``evaluation.json``: the models' sources and cards, the data set, device and versions.
"""

from __future__ import annotations

import math
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mapsim._version import __version__
from mapsim.errors import MapsimError
from mapsim.io.images import normalise as normalise_image
from mapsim.api import Dataset
from mapsim.runner.writer import ResultsWriter
from mapsim.runner.run import resolve_device
from mapsim.training.data import load_samples
from mapsim.training.loop import conv_module_parameters
from mapsim.training.models import SegmentationModel
from mapsim.training.predict import predict_mask

#: colours of the prediction panel (RGB in [0, 1])
COLOURS = {"tp": (1.0, 1.0, 1.0), "fp": (0.9, 0.1, 0.1), "fn": (0.2, 0.4, 1.0)}


@dataclass
class EvaluationResult:
    """What an evaluation produced: the folder and its main tables."""

    out_dir: Path
    per_image: pd.DataFrame
    summary: pd.DataFrame
    models: pd.DataFrame


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "image"


def prediction_rgb(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """An (H, W, 3) float image: TP, FP and FN pixels in :data:`COLOURS`, the rest black."""
    rgb = np.zeros((*pred.shape, 3), dtype=np.float32)
    rgb[pred & label] = COLOURS["tp"]
    rgb[pred & ~label] = COLOURS["fp"]
    rgb[~pred & label] = COLOURS["fn"]
    return rgb


def write_panel(path: Path, image: np.ndarray, label: np.ndarray, pred: np.ndarray,
                title: str) -> None:
    """Save the three-panel figure (image, label, coloured prediction) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    h, w = label.shape
    fig = Figure(figsize=(12, 4.6 * h / w + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    shown = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)
    if shown.ndim == 3:
        lo, hi = float(shown.min()), float(shown.max())
        shown = (shown - lo) / (hi - lo) if hi > lo else np.zeros_like(shown)
    axes[0].imshow(shown, cmap="gray", interpolation="nearest")
    axes[0].set_title("image")
    axes[1].imshow(label, cmap="gray", interpolation="nearest", vmin=0, vmax=1)
    axes[1].set_title("label")
    axes[2].imshow(prediction_rgb(pred, label), interpolation="nearest")
    axes[2].set_title("prediction")
    for ax in axes:
        ax.set_axis_off()
    handles = [Patch(facecolor=COLOURS[k], edgecolor="0.5", label=k.upper()) for k in COLOURS]
    fig.legend(handles=handles, loc="lower right", ncol=3, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _model_row(model: SegmentationModel) -> dict[str, Any]:
    module = model.loaded.module
    card = model.card or {}
    spec = card.get("spec") or {}
    arch = (card.get("model") or {}).get("architecture") or \
        model.loaded.source.get("build", {}).get("architecture", {}).get("params") or {}
    validation = (card.get("metrics") or {}).get("validation") or {}
    seconds = (card.get("time") or {}).get("training_seconds")
    return {
        "model": model.name,
        "weights": model.loaded.source.get("weights", {}).get("source"),
        "depth": arch.get("depth"),
        "parameters": sum(p.numel() for p in module.parameters()),
        "conv_module_parameters": conv_module_parameters(module),
        "batch_size": spec.get("batch_size"),
        "epochs": card.get("epochs"),
        "best_epoch": card.get("epoch"),
        "training_seconds": seconds,
        "val_iou": validation.get("iou"),
        "val_cldice": validation.get("cldice"),
    }


def evaluate(models: list[SegmentationModel], dataset: Dataset, out_dir: str | Path, *,
             device: str = "auto", amp: bool = False, panels: bool = True,
             overwrite: bool = False, progress: bool = True,
             data_spec: dict[str, Any] | None = None) -> EvaluationResult:
    """Segment every image of ``dataset`` with every model and write the results folder.

    Each model sees the images normalised as its training did (its card's ``normalise``,
    applied after the data set's own normalisation).

    :raises MapsimError: images without labels, a model that does not output two maps, an
        output folder that is not empty (without ``overwrite``).
    """
    from tqdm.auto import tqdm

    from mapsim.segmentation import SegmentationAccumulator, skeleton

    names = [m.name for m in models]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise MapsimError(
            f"two models are named {dup!r}; name them apart with NAME=MODEL."
        )
    started = time.time()
    dev = resolve_device(device)
    writer = ResultsWriter(out_dir, overwrite=overwrite)
    try:
        samples = load_samples(dataset, "none", "data")
        skeletons = [skeleton(s.label) for s in samples]
        rows, summary_rows = [], []
        for model in models:
            module = model.loaded.module.to(dev).eval()
            acc = SegmentationAccumulator()
            for s, sk in tqdm(list(zip(samples, skeletons)), disable=not progress,
                              desc=model.name, leave=False, unit="image"):
                image = normalise_image(s.image, model.normalise)
                pred = predict_mask(module, image, dev, amp, f"model {model.name!r}")
                (counts,) = acc.update(pred, s.label, ids=s.id, label_skeletons=[sk])
                metrics = counts.metrics()
                rows.append({"model": model.name, "image": s.id, **metrics,
                             **{k: v for k, v in counts.as_dict().items()}})
                if panels:
                    title = (f"{model.name}, {s.id}: IoU {metrics['iou']:.3f}, "
                             f"clDice {metrics['cldice']:.3f}")
                    write_panel(writer.staging / "panels" / _safe(model.name)
                                / f"{_safe(s.id)}.png", image, s.label, pred, title)
            module.to("cpu")
            per_model = pd.DataFrame(rows)
            per_model = per_model[per_model.model == model.name]
            pooled = acc.pooled()
            for metric in pooled:
                values = per_model[metric].to_numpy(dtype=float)
                summary_rows.append({
                    "model": model.name, "metric": metric, "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                    "pooled": pooled[metric], "n_images": len(values),
                })
        per_image = pd.DataFrame(rows)
        summary = pd.DataFrame(summary_rows)
        model_table = pd.DataFrame([_model_row(m) for m in models])
        writer.write_table("per_image", per_image)
        writer.write_table("summary", summary)
        writer.write_table("models", model_table)
        writer.write_json("evaluation.json", {
            "mapsim_version": __version__,
            "data": data_spec,
            "n_images": len(samples),
            "images": [s.id for s in samples],
            "models": {m.name: {"source": m.loaded.source, "normalise": m.normalise,
                                "card": m.card} for m in models},
            "device": str(dev),
            "amp": bool(amp and dev.type == "cuda"),
            "panels": panels,
            "seconds": round(time.time() - started, 3),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__},
        })
        target = writer.publish()
    except BaseException:
        writer.discard()
        raise
    return EvaluationResult(target, per_image, summary, model_table)


def format_summary(summary: pd.DataFrame,
                   metrics: tuple[str, ...] = ("iou", "cldice", "dice", "precision",
                                               "recall", "accuracy")) -> str:
    """A small text table: one row per model, mean ± std of the main metrics."""
    lines = [f"  {'model':<14}" + "".join(f"{m:>18}" for m in metrics)]
    for model, group in summary.groupby("model", sort=False):
        by = group.set_index("metric")
        cells = []
        for m in metrics:
            mean, std = by.loc[m, "mean"], by.loc[m, "std"]
            cells.append(f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f}")
        lines.append(f"  {model:<14}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)
