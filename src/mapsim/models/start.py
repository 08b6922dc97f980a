"""Did two compared models start from the same weights?

Two trained networks whose layers started from the same random tensors share structure that
has nothing to do with what they learned: their first layers can stay close through training
(the bundled CNN6 and CNN10 of mapsim 0.1 were both trained from seed 0, and their L1 kernels
differ by at most 0.019). A run therefore checks every comparison of two different models:

* **same start**: each model's starting point is known when it is a seeded initialisation
  (an ``architecture`` with a ``seed`` and no weights), bundled weights (their card records
  the architecture and the training seed) or a weights file with a mapsim card beside it
  (``best.json`` beside ``best.safetensors``). Both starts are rebuilt (cheap: no data, no
  training) and every captured layer whose parameters were equal at the start is named;
* **identical weights**: a captured layer whose parameters are equal now (e.g. one network
  compared with a copy of itself under another name).

The findings go to ``run.json`` (``shared_start``) and are printed as a warning.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapsim.models.build import PRETRAINED_PREFIX, build_model, pretrained_card
from mapsim.models.selectors import module_path


@dataclass(frozen=True)
class Start:
    """Where a model's weights started: an architecture (its spec choice, as a dict) and the
    seed of its initialisation; ``source`` says how this is known."""

    architecture: dict[str, Any]
    seed: int
    source: str

    @property
    def key(self) -> str:
        """Equal for equal starts (architecture and seed), whatever the source."""
        return json.dumps([self.architecture, self.seed], sort_keys=True)


@dataclass(frozen=True)
class SharedStart:
    """Layers of two compared models with equal parameters at the start or now."""

    model_a: str
    model_b: str
    #: (label in model a, label in model b) of the layers affected
    layers: tuple[tuple[str, str], ...]
    why: str

    def message(self) -> str:
        names = ", ".join(a if a == b else f"{a}/{b}" for a, b in self.layers)
        return (f"models {self.model_a!r} and {self.model_b!r} {self.why} in layer(s) {names}: "
                "similarities between them there partly reflect that shared start, not what "
                "they learned. Networks trained from different seeds give the baseline to "
                "compare with.")

    def record(self) -> dict[str, Any]:
        """The entry of run.json's ``shared_start``."""
        return {"models": [self.model_a, self.model_b],
                "layers": [list(pair) for pair in self.layers], "why": self.why}


def start_of(mspec: Any, base_dir: Path) -> Start | None:
    """The starting point of a run spec's model, when it can be known (see the module)."""
    if mspec.torchscript is not None or mspec.python is not None:
        return None
    if mspec.weights is None:
        if mspec.architecture is None:
            return None
        return Start(mspec.architecture.model_dump(mode="json"), int(mspec.seed),
                     f"seeded initialisation (seed {mspec.seed})")
    text = str(mspec.weights)
    if text.startswith(PRETRAINED_PREFIX):
        name = text[len(PRETRAINED_PREFIX):]
        card = pretrained_card(name)
        source = f"the card of pretrained:{name}"
    else:
        path = Path(text) if Path(text).is_absolute() else Path(base_dir) / text
        try:
            card = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        source = f"the card beside {path.name}"
    architecture = (card.get("model") or {}).get("architecture")
    if not isinstance(architecture, dict) or not isinstance(card.get("seed"), int):
        return None
    return Start(architecture, card["seed"], f"{source} (seed {card['seed']})")


def layer_fingerprints(module: nn.Module, paths: list[str]) -> dict[str, str]:
    """sha256 of the parameters and buffers under each module path (name, shape and bytes)."""
    state = module.state_dict()
    out = {}
    for path in paths:
        digest = hashlib.sha256()
        prefix = f"{module_path(path)}."  # head['logits'] -> the parameters under head
        for key in sorted(k for k in state if k.startswith(prefix)):
            tensor = state[key].detach().cpu().contiguous()
            digest.update(f"{key[len(prefix):]}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16
                          else tensor.float().numpy().tobytes())
        out[path] = digest.hexdigest() if state and any(
            k.startswith(prefix) for k in state) else ""
    return out


def initial_fingerprints(start: Start, registry: Any, paths: list[str]) -> dict[str, str]:
    """The fingerprints of ``paths`` in the model rebuilt from its start."""
    params = {k: v for k, v in start.architecture.items() if k != "name"}
    architecture = registry.create("architecture", start.architecture["name"], params)
    module = build_model("start", architecture=architecture, seed=start.seed).module
    return layer_fingerprints(module, paths)


def shared_starts(comparisons: list[tuple[str, str]], layers: dict[str, dict[str, str]],
                  now: dict[str, dict[str, str]],
                  at_start: dict[str, dict[str, str] | None]) -> list[SharedStart]:
    """The comparisons of two different models with layers that share parameters.

    ``layers``: model -> {label: module path}; ``now`` and ``at_start``: model -> {module
    path: fingerprint} of the weights as loaded and as they started (None: start unknown).
    A layer counts when both models capture a module at the same path (with parameters).
    """
    found = []
    for a, b in comparisons:
        if a == b:
            continue
        path_to_b = {path: label for label, path in layers[b].items()}
        for fingerprints, why in ((now, "have identical weights"),
                                  (at_start, "started from the same weights")):
            fa, fb = fingerprints.get(a), fingerprints.get(b)
            if not fa or not fb:
                continue
            pairs = tuple((label, path_to_b[path]) for label, path in layers[a].items()
                          if path in path_to_b and fa.get(path) and fa.get(path) == fb.get(path))
            if pairs:
                found.append(SharedStart(a, b, pairs, why))
                break  # identical weights imply the same start: say the stronger once
    return found
