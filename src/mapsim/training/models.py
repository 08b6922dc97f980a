"""Segmentation models named on the command line: bundled weights, checkpoints, model specs.

``mapsim evaluate`` (and the Python API) accept a model as

- ``pretrained:NAME``: the bundled weights and their card, which names the architecture;
- a weights file with a card beside it (``runs/cnn6/best.safetensors`` + ``best.json``, as
  ``mapsim train`` writes them), or with the card in its safetensors metadata;
- a model spec: a file (a run spec's model, or a single model mapping) or inline YAML such as
  ``'{architecture: {name: fcn, depth: 6, width: 64, kernel_size: 7}, weights: w.pt}'``.

Any of them may be prefixed with ``NAME=`` to choose the model's name in the tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapsim.errors import ModelError, SpecError
from mapsim.models.build import (
    PRETRAINED_PREFIX,
    LoadedModel,
    build_from_spec,
    build_model,
    pretrained_card,
)
from mapsim.registry import Registry, load_registry
from mapsim.spec.run_spec import NAME_PATTERN, read_model_spec
from mapsim.training.checkpoint import read_card

_NAMED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)=(.+)$", re.DOTALL)
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class SegmentationModel:
    """A model ready to segment, with what is known about how it was trained.

    :ivar name: the model's name in tables and file names.
    :ivar loaded: the built model (eval mode, CPU) and its source record.
    :ivar card: the training card of its weights (None when there is none).
    :ivar normalise: the per-image normalisation its training used (``zscore`` without card).
    """

    name: str
    loaded: LoadedModel
    card: dict[str, Any] | None = None
    normalise: str = "zscore"


def _from_card(name: str, card: dict[str, Any], weights: str, registry: Registry,
               base_dir: Path) -> LoadedModel:
    model = card.get("model") or {}
    arch = model.get("architecture")
    if not arch and not model.get("python"):
        raise ModelError(
            f"model {name!r}: the card of {weights!r} does not say which architecture the "
            "weights fit. Give a model spec with 'architecture' and 'weights' instead."
        )
    architecture = None
    if arch:
        params = {k: v for k, v in arch.items() if k != "name"}
        architecture = registry.create("architecture", arch["name"], params)
    return build_model(name, architecture=architecture, python=model.get("python"),
                       kwargs=model.get("kwargs") or {}, weights=weights, base_dir=base_dir)


def load_segmentation_model(arg: str, *, base_dir: str | Path = ".",
                            registry: Registry | None = None) -> SegmentationModel:
    """Build the model that ``arg`` names (see the module's docstring for the forms).

    :raises MapsimError: unknown pretrained weights, a weights file without card (give a model
        spec then), an invalid model spec, weights that do not fit.
    """
    registry = registry or load_registry()
    base = Path(base_dir)
    name: str | None = None
    match = _NAMED.match(arg)
    if match and not Path(arg).exists():
        name, arg = match.group(1), match.group(2)

    if arg.startswith(PRETRAINED_PREFIX):
        pretrained = arg[len(PRETRAINED_PREFIX):]
        card = pretrained_card(pretrained)
        name = name or pretrained
        loaded = _from_card(name, card, arg, registry, base)
        return SegmentationModel(name, loaded, card, card.get("normalise", "zscore"))

    path = Path(arg).expanduser()
    path = path if path.is_absolute() else base / path
    if path.suffix.lower() in _WEIGHT_SUFFIXES:
        if not path.is_file():
            raise ModelError(f"the weights file {path} does not exist. Check the path.")
        card = read_card(path)
        if card is None:
            raise ModelError(
                f"the weights file {path} has no card (no {path.with_suffix('.json').name} "
                "beside it) saying which architecture it fits. Give a model spec instead, e.g. "
                f"'{{architecture: {{name: fcn, depth: 6}}, weights: {arg}}}'."
            )
        name = name or card.get("name") or path.stem
        loaded = _from_card(name, card, str(path), registry, base)
        return SegmentationModel(name, loaded, card, card.get("normalise", "zscore"))

    return _from_model_spec(arg, name, base, registry)


def _from_model_spec(arg: str, name: str | None, base: Path,
                     registry: Registry) -> SegmentationModel:
    name, mspec, base = read_model_spec(arg, name, registry=registry, base_dir=base)
    if re.match(NAME_PATTERN, name) is None:
        raise SpecError(f"model name {name!r}: use letters, digits, '_', '.' and '-' only")
    loaded = build_from_spec(name, mspec, registry, base)
    card = None
    if mspec.weights:
        if mspec.weights.startswith(PRETRAINED_PREFIX):
            card = pretrained_card(mspec.weights[len(PRETRAINED_PREFIX):])
        else:
            weights = Path(mspec.weights)
            card = read_card(weights if weights.is_absolute() else base / weights)
    normalise = card.get("normalise", "zscore") if card else "zscore"
    return SegmentationModel(name, loaded, card, normalise)
