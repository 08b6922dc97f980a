"""``mapsim prune SPEC``: every criterion at every sparsity and seed, scored and written.

The results folder (appears whole or not at all) holds

- ``prune.csv``: one row per seed, criterion, pruned layer set (``layers``: the layers pruned
  together, ``;``-separated; with ``per_layer`` each layer alone) and sparsity (empty: the
  criterion's threshold): maps removed, parameters, MACs per image, IoU and clDice on the
  evaluation images right after pruning and after fine-tuning (criterion ``none``: the
  unpruned model);
- ``prune_summary.csv``: the same rows averaged over seeds (mean and sample std), with the drop
  in IoU from the unpruned model; ``prune_answer.csv``: per criterion and layer set, the
  largest sparsity whose mean IoU drop stays within ``tolerance``, before and after
  fine-tuning (:mod:`mapsim.pruning.summary`);
- ``prune.png`` (IoU against parameters, a line per criterion, error bars over seeds) and
  ``prune.html`` (the figure and the tables) (:mod:`mapsim.pruning.figure`);
- ``prune.json``: the spec and, per row, the kept -> original map indices, the compensation
  coefficients and the channel widths;
- with ``save_models``: ``models/<criterion>-<sparsity>-<layers>-s<seed>/model.safetensors``
  and ``model.json`` (:mod:`mapsim.pruning.save`).
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mapsim._version import __version__
from mapsim.devices import resolve_device
from mapsim.registry import load_registry
from mapsim.runner.writer import ResultsWriter
from mapsim.segmentation import skeleton
from mapsim.training.data import TrainingBatches, load_samples
from mapsim.training.loop import build_training_model, validate
from mapsim.pruning.costs import count_macs, parameter_count
from mapsim.pruning.graph import make_graph
from mapsim.pruning.prune import prune_model
from mapsim.pruning.save import pruned_card, save_pruned
from mapsim.pruning.summary import answer, summarise


def finetune(model: nn.Module, samples: list, epochs: int, lr: float, batch_size: int,
             seed: int, device: torch.device | str = "cpu") -> None:
    """Train ``model`` (on ``device``) in place for ``epochs`` (cross-entropy, SGD with
    momentum 0.9, whole images in a seeded order)."""
    device = torch.device(device)
    batches = TrainingBatches(samples, batch_size, None, False, False, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        for images, labels in batches.batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            x = torch.from_numpy(images).to(device)
            loss = loss_fn(model(x), torch.from_numpy(labels).to(device))
            loss.backward()
            optimizer.step()
    model.eval()


def _slug(criterion: str, level: float | None, layers: str, seed: int) -> str:
    text = f"{criterion}-{'threshold' if level is None else f'{level:g}'}-{layers}-s{seed}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


class _Scorer:
    """IoU and clDice on the evaluation images (their skeletons computed once)."""

    def __init__(self, samples: list, device: torch.device) -> None:
        self.samples, self.device = samples, device
        self.skeletons = [skeleton(s.label) for s in samples]

    def __call__(self, model: nn.Module) -> dict[str, float]:
        s = validate(model, self.samples, self.device, False, self.skeletons)
        return {"iou": float(s["iou"]), "cldice": float(s["cldice"])}


def layer_sets(spec: Any, model: nn.Module, example: torch.Tensor) -> list[list[str] | None]:
    """The layer sets pruned: all of ``spec.layers`` together (None: the default layers), or
    with ``per_layer`` each of them alone."""
    if not spec.per_layer:
        return [spec.layers]
    names = spec.layers or make_graph(model, example, spec.backend).candidates()
    return [[name] for name in names]


def run_prune(spec: Any, base_dir: Path, out_dir: str | Path, overwrite: bool = False,
              device: str | None = None, progress: bool = False) -> Path:
    """Run a validated prune spec; returns the published results folder."""
    registry = load_registry()
    dev = resolve_device(device or spec.device)

    def dataset(choice: Any) -> Any:
        return registry.create("dataset", choice.name, choice.model_dump(exclude={"name"}),
                               base_dir=base_dir)

    calibration = load_samples(dataset(spec.calibration), spec.normalise, "calibration")
    score = _Scorer(load_samples(dataset(spec.evaluation), spec.normalise, "evaluation"), dev)
    train = None
    if spec.finetune.epochs:
        train = load_samples(dataset(spec.finetune.data), spec.normalise, "finetune.data")
    images = torch.from_numpy(np.stack([s.image for s in calibration])).to(dev)
    example = images[:1]
    rows, records = [], []
    started = time.perf_counter()
    # with weights, the unpruned model is the same for every seed, and so is what a
    # criterion without randomness removes: pruned and scored once (fine-tuned per seed)
    reuse = spec.model.weights is not None
    cache: dict[tuple, Any] = {}
    writer = ResultsWriter(out_dir, overwrite=overwrite)
    try:
        for seed in spec.seeds:
            source = SimpleNamespace(name=spec.name, model=spec.model, seed=seed)
            base = build_training_model(source, registry, base_dir).module.to(dev).eval()
            original = {"parameters": parameter_count(base), "macs": count_macs(base, example)}
            unpruned = score(base)
            rows.append({"seed": seed, "criterion": "none", "layers": "", "sparsity": 0.0,
                         "maps_removed": 0, **original, "iou_pruned": unpruned["iou"],
                         "cldice_pruned": unpruned["cldice"], "iou_finetuned": np.nan,
                         "cldice_finetuned": np.nan})
            for choice in spec.criteria:
                entry = registry.get("prune_criterion", choice.name)
                params = choice.model_dump(exclude={"name"})
                criterion = entry.cls(entry.cls.Params(**params))
                levels: list[float | None] = list(spec.sparsity)
                if spec.threshold and criterion.supports_threshold:
                    levels.append(None)
                for layers in layer_sets(spec, base, example):
                    for level in levels:
                        if progress:
                            print(f"  [{time.perf_counter() - started:7.1f} s] seed {seed} "
                                  f"{choice.name} {layers or 'all'} "
                                  f"{'threshold' if level is None else level}", flush=True)
                        key = (choice.name, str(params), str(layers), level)
                        if key in cache:
                            out, costs, before = cache[key]
                        else:
                            out = prune_model(base, criterion, images, layers=layers,
                                              sparsity=level, seed=seed, backend=spec.backend)
                            costs = {"parameters": parameter_count(out.model),
                                     "macs": count_macs(out.model, example)}
                            before = score(out.model)
                            if reuse and not criterion.uses_rng:  # same for every seed
                                cache[key] = (out, costs, before)
                        after = {"iou": np.nan, "cldice": np.nan}
                        final = out.model
                        if train is not None:
                            final = copy.deepcopy(out.model)
                            finetune(final, train, spec.finetune.epochs, spec.finetune.lr,
                                     spec.finetune.batch_size, seed, dev)
                            after = score(final)
                        names = ";".join(out.kept)
                        rows.append({"seed": seed, "criterion": choice.name, "layers": names,
                                     "sparsity": level,
                                     "maps_removed": sum(len(v) for v in out.removed.values()),
                                     **costs, "iou_pruned": before["iou"],
                                     "cldice_pruned": before["cldice"],
                                     "iou_finetuned": after["iou"],
                                     "cldice_finetuned": after["cldice"]})
                        records.append({
                            "criterion": choice.name, "layers": names, "sparsity": level,
                            "seed": seed, "kept": out.kept, "widths": out.widths,
                            "uncompensated": out.uncompensated,
                            "compensation": {layer: {str(j): v for j, v in rec.items()}
                                             for layer, rec in out.compensation.items()}})
                        if spec.save_models:
                            slug = _slug(choice.name, level, names, seed)
                            card = pruned_card(
                                name=slug, model_spec=spec.model, normalise=spec.normalise,
                                criterion=choice.name, params=params, sparsity=level,
                                seed=seed, outcome=out,
                                costs={**costs, "original": original,
                                       "input_size": list(example.shape[-2:])},
                                metrics={"unpruned": unpruned, "pruned": before,
                                         "finetuned": None if train is None else after},
                                finetune=spec.finetune.model_dump(mode="json")
                                if train is not None else None)
                            save_pruned(writer.staging / "models" / slug, final.cpu(), card)
                            final.to(dev)
        table = pd.DataFrame(rows)
        summary = summarise(table)
        answers = answer(summary, spec.tolerance)
        writer.write_table("prune", table)
        writer.write_table("prune_summary", summary)
        writer.write_table("prune_answer", answers)
        from mapsim.pruning.figure import write_figure, write_html

        write_figure(summary, writer.staging / "prune.png", spec.name)
        write_html(summary, answers, writer.staging / "prune.html", spec.name, spec.tolerance)
        writer.write_json("prune.json", {"mapsim_version": __version__,
                                         "spec": spec.model_dump(mode="json"),
                                         "device": str(dev), "runs": records})
        return writer.publish()
    except BaseException:
        writer.discard()
        raise
