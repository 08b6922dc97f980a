"""Checkpoints of a training run: safetensors for tensors, JSON for everything else.

A run's output folder holds

- ``best.safetensors`` + ``best.json``: the weights of the epoch with the best validation IoU
  (a plain state dict, usable as ``weights:`` in any spec) and its card (spec, seed, epoch,
  metrics, time, device, versions, command line). The card is also stored in the weights
  file's metadata, so the file alone says where it came from.
- ``last.safetensors`` + ``last.json``: everything needed to resume after the last finished
  epoch: model, optimiser state and random-generator states as tensors; epoch, history, best
  score and optimiser settings as JSON (inside the safetensors metadata, which is what resume
  reads, so the pair can never disagree; ``last.json`` is a readable copy).

Every file is written to a temporary name and renamed (:mod:`mapsim.io.atomic`), so a kill
leaves either the old or the new file, never half of one; files get the mode of a normally
created file (0o666 less the umask), like every file mapsim writes. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from mapsim.errors import MapsimError
from mapsim.io.atomic import atomic_path, atomic_write_json

BEST = "best"
LAST = "last"
LOG = "log.csv"
#: metadata key of the JSON document stored inside a checkpoint's safetensors file
META_KEY = "mapsim"
CARD_FORMAT = "mapsim-card/1"
STATE_FORMAT = "mapsim-train-state/1"


class CheckpointError(MapsimError):
    """A checkpoint that cannot be written, read, or does not fit the run."""


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path,
                        document: dict[str, Any] | None = None) -> None:
    """Save ``tensors`` (and ``document`` as JSON metadata) to ``path`` via a temporary file."""
    metadata = {META_KEY: json.dumps(document, default=str)} if document is not None else None
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as indented JSON, atomically."""
    atomic_write_json(path, document, default=str)


def read_document(path: Path) -> dict[str, Any] | None:
    """The JSON document stored in a safetensors file's metadata (None when there is none).

    :raises CheckpointError: the file cannot be read as safetensors.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}).") from exc
    text = metadata.get(META_KEY)
    return json.loads(text) if text else None


# --------------------------------------------------------------------------- best
def save_best(folder: Path, model: torch.nn.Module, card: dict[str, Any]) -> Path:
    """Write ``best.safetensors`` (the model's state dict, card in its metadata), then
    ``best.json``. Returns the weights path."""
    path = Path(folder) / f"{BEST}.safetensors"
    atomic_save_tensors(dict(model.state_dict()), path, card)
    write_json(path.with_suffix(".json"), card)
    return path


def read_card(weights: str | Path) -> dict[str, Any] | None:
    """The card of a weights file: ``NAME.json`` beside ``NAME.safetensors``, else the one in
    the file's metadata; None when there is neither."""
    weights = Path(weights)
    sidecar = weights.with_suffix(".json")
    if sidecar.is_file():
        try:
            return json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"the card {sidecar} is not readable JSON ({exc}).") from exc
    if weights.suffix.lower() == ".safetensors" and weights.is_file():
        return read_document(weights)
    return None


# --------------------------------------------------------------------------- last
def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for index, entry in state["state"].items():
        values = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                values[key] = value
        plain[str(index)] = values
    return tensors, {"param_groups": state["param_groups"], "state": plain}


def _optimizer_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in plain["state"].items()}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_tensors() -> dict[str, torch.Tensor]:
    """The CPU (and every CUDA device's) torch random-generator state."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_tensors` saved (CUDA states only where the devices exist)."""
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")),
                  key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def save_last(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              state: dict[str, Any]) -> Path:
    """Write ``last.safetensors`` (model, optimiser, RNG; ``state`` as metadata) and
    ``last.json``. Returns the checkpoint's path."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim_tensors, optim_plain = _optimizer_tensors(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors.update(rng_tensors())
    document = {"format": STATE_FORMAT, **state, "optimizer": optim_plain}
    path = Path(folder) / f"{LAST}.safetensors"
    atomic_save_tensors(tensors, path, document)
    write_json(path.with_suffix(".json"), document)
    return path


def load_last(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                     dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``last.safetensors``: (model state, optimiser state, RNG tensors, state document).

    :raises CheckpointError: no such file, or it is not a mapsim training state.
    """
    path = Path(folder) / f"{LAST}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"there is no checkpoint to resume from: {path} does not exist.")
    document = read_document(path)
    if not document or document.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{path} is not a mapsim training checkpoint (no {STATE_FORMAT!r} state in its "
            "metadata). Start a fresh run with --overwrite."
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}).") from exc
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = _optimizer_state(
        {k: v for k, v in tensors.items() if k.startswith("optimizer.")}, document["optimizer"]
    )
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return model, optim, rng, document
