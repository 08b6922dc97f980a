"""Saving a pruned model: ``model.safetensors`` (a plain state dict) and ``model.json`` (its card).

The card (also stored in the safetensors metadata, so the file alone says what it is) holds:

- ``format`` (``mapsim-card/1``), ``name``, ``normalise``;
- ``model``: the network it was pruned from (architecture with its parameters, or python
  factory and kwargs), which loading builds before resizing it;
- ``source``: the prune spec's model entry (with its weights, e.g. ``pretrained:cnn6``);
- ``pruned``: ``criterion`` and its ``params``, ``sparsity`` (null: the criterion's
  threshold), ``seed``, ``layers`` (each pruned layer's kept maps, original indices in the
  pruned model's order), ``removed``, ``compensation``, ``channels`` (for every convolution,
  linear layer and batch norm: its ``out`` and ``in`` channels' original indices) and
  ``widths`` (the channel attributes of the modules that changed: what rebuilding needs);
- ``parameters`` and ``macs`` (per image of ``input_size``), before (``original``) and after;
- ``metrics``: IoU and clDice of the unpruned model, right after pruning, and after
  fine-tuning (null without); ``finetune``: its settings;
- ``mapsim_version``.

The pruned model loads wherever weights with a card do: ``mapsim evaluate
runs/prune/models/NAME/model.safetensors``, and in a run spec as ``weights:`` beside the
architecture it was pruned from (:mod:`mapsim.models.widths`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mapsim._version import __version__
from mapsim.training.checkpoint import CARD_FORMAT, atomic_save_tensors, write_json

WEIGHTS = "model.safetensors"


def model_entry(model_spec: Any) -> dict[str, Any]:
    """The card's ``model``: how to build the unpruned network (no weights)."""
    data = model_spec.model_dump(mode="json") if hasattr(model_spec, "model_dump") \
        else dict(model_spec)
    arch = data.get("architecture")
    return {"architecture": arch, "python": data.get("python"),
            "kwargs": data.get("kwargs") or {}, "weights": None}


def pruned_card(*, name: str, model_spec: Any, normalise: str, criterion: str,
                params: dict[str, Any], sparsity: float | None, seed: int, outcome: Any,
                costs: dict[str, Any], metrics: dict[str, Any],
                finetune: dict[str, Any] | None) -> dict[str, Any]:
    """The card of a pruned model (see the module docs); ``outcome`` a
    :class:`~mapsim.pruning.prune.PruneOutcome`."""
    return {
        "format": CARD_FORMAT,
        "name": name,
        "model": model_entry(model_spec),
        "source": model_spec.model_dump(mode="json") if hasattr(model_spec, "model_dump")
        else dict(model_spec),
        "normalise": normalise,
        "pruned": {
            "criterion": criterion, "params": params, "sparsity": sparsity, "seed": seed,
            "layers": outcome.kept, "removed": outcome.removed,
            "compensation": {layer: {str(j): v for j, v in rec.items()}
                             for layer, rec in outcome.compensation.items()},
            "uncompensated": outcome.uncompensated,
            "channels": outcome.channels, "widths": outcome.widths,
        },
        **costs,
        "metrics": metrics,
        "finetune": finetune,
        "mapsim_version": __version__,
    }


def save_pruned(folder: str | Path, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``folder/model.safetensors`` (card in its metadata) and ``folder/model.json``,
    each atomically. Returns the weights' path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WEIGHTS
    state = {k: v for k, v in model.state_dict().items()}
    atomic_save_tensors(state, path, card)
    write_json(path.with_suffix(".json"), card)
    return path


__all__ = ["WEIGHTS", "model_entry", "pruned_card", "save_pruned"]
