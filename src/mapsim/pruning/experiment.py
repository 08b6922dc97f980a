"""``mapsim prune SPEC``: every criterion at every sparsity and seed, scored and written.

The results folder (appears whole or not at all) holds ``prune.csv``, one row per criterion,
sparsity (empty: the criterion's threshold) and seed: maps removed, parameters, and IoU and
clDice on the evaluation images before and after fine-tuning (criterion ``none``: the
unpruned model); and ``prune.json``: the spec, and per row the kept -> original map indices
and the compensation coefficients.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mapsim._version import __version__
from mapsim.registry import load_registry
from mapsim.runner.writer import ResultsWriter
from mapsim.training.data import TrainingBatches, load_samples
from mapsim.training.loop import build_training_model, validate
from mapsim.pruning.prune import prune_model
from mapsim.pruning.surgery import parameter_count


def finetune(model: nn.Module, samples: list, epochs: int, lr: float, batch_size: int,
             seed: int) -> None:
    """Train ``model`` in place for ``epochs`` (cross-entropy, SGD, momentum 0.9)."""
    batches = TrainingBatches(samples, batch_size, None, False, False, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        for images, labels in batches.batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(torch.from_numpy(images)), torch.from_numpy(labels))
            loss.backward()
            optimizer.step()
    model.eval()


def run_prune(spec: Any, base_dir: Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Run a validated prune spec; returns the published results folder."""
    registry = load_registry()

    def dataset(choice: Any) -> Any:
        return registry.create("dataset", choice.name, choice.model_dump(exclude={"name"}),
                               base_dir=base_dir)

    calibration = load_samples(dataset(spec.calibration), spec.normalise, "calibration")
    evaluation = load_samples(dataset(spec.evaluation), spec.normalise, "evaluation")
    train = None
    if spec.finetune.epochs:
        train = load_samples(dataset(spec.finetune.data), spec.normalise, "finetune.data")
    images = torch.from_numpy(np.stack([s.image for s in calibration]))
    device = torch.device("cpu")
    rows, records = [], []
    writer = ResultsWriter(out_dir, overwrite=overwrite)
    try:
        for seed in spec.seeds:
            source = SimpleNamespace(name=spec.name, model=spec.model, seed=seed)
            base = build_training_model(source, registry, base_dir).module.eval()
            scores = validate(base, evaluation, device, False)
            rows.append({"criterion": "none", "sparsity": 0.0, "seed": seed, "maps_removed": 0,
                         "parameters": parameter_count(base), "iou_pruned": scores["iou"],
                         "cldice_pruned": scores["cldice"], "iou_finetuned": np.nan,
                         "cldice_finetuned": np.nan})
            for choice in spec.criteria:
                entry = registry.get("prune_criterion", choice.name)
                criterion = entry.cls(entry.cls.Params(**choice.model_dump(exclude={"name"})))
                levels: list[float | None] = list(spec.sparsity)
                if spec.threshold and criterion.supports_threshold:
                    levels.append(None)
                for level in levels:
                    out = prune_model(base, criterion, images, layers=spec.layers,
                                      sparsity=level, seed=seed)
                    before = validate(out.model, evaluation, device, False)
                    after = {"iou": np.nan, "cldice": np.nan}
                    if train is not None:
                        tuned = copy.deepcopy(out.model)
                        finetune(tuned, train, spec.finetune.epochs, spec.finetune.lr,
                                 spec.finetune.batch_size, seed)
                        after = validate(tuned, evaluation, device, False)
                    rows.append({
                        "criterion": choice.name, "sparsity": level, "seed": seed,
                        "maps_removed": sum(len(v) for v in out.removed.values()),
                        "parameters": parameter_count(out.model),
                        "iou_pruned": before["iou"], "cldice_pruned": before["cldice"],
                        "iou_finetuned": after["iou"], "cldice_finetuned": after["cldice"]})
                    records.append({"criterion": choice.name, "sparsity": level, "seed": seed,
                                    "kept": out.kept, "compensation": {
                                        layer: {str(j): v for j, v in rec.items()}
                                        for layer, rec in out.compensation.items()}})
        table = pd.DataFrame(rows)
        writer.write_table("prune", table)
        writer.write_json("prune.json", {"mapsim_version": __version__,
                                         "spec": spec.model_dump(mode="json"),
                                         "runs": records})
        return writer.publish()
    except BaseException:
        writer.discard()
        raise
