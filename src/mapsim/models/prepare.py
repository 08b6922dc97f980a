"""A spec's models made ready for a run: built, weighted, on the device, layers resolved."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mapsim.api import Extractor, FusesForInference
from mapsim.errors import SpecError
from mapsim.models.build import LoadedModel, build_from_spec
from mapsim.models.layers import resolve_layers
from mapsim.models.selectors import module_path, split_path
from mapsim.models.start import Start, layer_fingerprints, start_of
from mapsim.registry import Registry


@dataclass
class PreparedModel:
    """A loaded model with its extractor and the layers to capture (label -> path)."""

    loaded: LoadedModel
    extractor: Extractor
    layers: dict[str, str]
    #: as built (before any batch norm is folded)
    parameters: int = 0
    #: modules whose batch norm was folded into their convolution
    fused: list[str] = field(default_factory=list)
    #: module path -> fingerprint of its weights as loaded (before any folding)
    fingerprints: dict[str, str] = field(default_factory=dict)
    #: where the weights started, when that is known (see :mod:`mapsim.models.start`)
    start: Start | None = None
    #: how 3-D (1, L, D) outputs become maps (a ``TokenSpec``; None: they are refused)
    tokens: Any = None


def layer_labels(spec_layers: Any, available: list[str], model: str) -> dict[str, str]:
    """``{label: module path}`` from a spec's layers entry (list, pattern or mapping)."""
    if isinstance(spec_layers, dict):
        labels = {}
        for label, path in spec_layers.items():
            base = split_path(path)[0]
            if base not in available:
                matched = resolve_layers(available, path, model)  # unknown: lists the closest
                raise SpecError(
                    f"layers.{model}.{label}: a {{label: path}} entry needs one exact module "
                    f"path, but {path!r} is a pattern matching {len(matched)} layers "
                    f"({', '.join(matched[:5])}{', ...' if len(matched) > 5 else ''})"
                )
            if path in labels.values():
                raise SpecError(f"layers.{model}: the layer {path!r} is given two labels")
            labels[label] = path
        order = {p: i for i, p in enumerate(available)}
        return dict(sorted(labels.items(),
                           key=lambda item: (order[split_path(item[1])[0]], item[1])))
    paths = resolve_layers(available, spec_layers, model)
    return {p: p for p in paths}


def prepare_model(name: str, spec: Any, registry: Registry, base_dir: Path,
                  device: torch.device) -> PreparedModel:
    """Build model ``name`` of a run spec, move it to ``device`` in eval mode, resolve its
    layers and (``engine.fuse_batchnorm``) let it fold what it can for inference."""
    mspec = spec.models[name]
    loaded = build_from_spec(name, mspec, registry, base_dir)
    loaded.module.to(device).eval()
    extractor = registry.create(
        "extractor", mspec.extractor.name, mspec.extractor.model_dump(exclude={"name"})
    )
    available = extractor.layer_names(loaded.module)
    layers = layer_labels(spec.layers[name], available, name)
    parameters = sum(p.numel() for p in loaded.module.parameters())
    fingerprints = layer_fingerprints(loaded.module, list(layers.values()))
    fused: list[str] = []
    if isinstance(loaded.module, FusesForInference) and spec.engine.fuse_batchnorm:
        fused = loaded.module.fuse_for_inference(
            list(dict.fromkeys(module_path(p) for p in layers.values())))
    if device.type == "cuda":
        # cuDNN's tensor-core convolutions run on channels-last tensors without transposes
        # (same float32 values; maps are copied out of the hooks anyway)
        loaded.module.to(memory_format=torch.channels_last)
    return PreparedModel(loaded, extractor, layers, parameters, fused, fingerprints,
                         start_of(mspec, base_dir), getattr(mspec, "tokens", None))
