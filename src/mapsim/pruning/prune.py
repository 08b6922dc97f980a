"""Pruning a model layer by layer with a criterion.

For each layer in order (first to last), the current network -- already pruned and compensated
in the layers before -- runs on the calibration images; the layer's output maps (after the
ReLU) give its :class:`~mapsim.Moments` (the engine's ``compute_moments``, float64) and the
:class:`~mapsim.PruneLayer` the criterion sees. The criterion's choice is applied: first the
compensation (if it names partners, :func:`~mapsim.pruning.compensate.fold` into the next
convolution), then the structural removal (:func:`~mapsim.pruning.surgery.remove_maps`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mapsim.engine.moments import compute_moments
from mapsim.errors import SpecError
from mapsim.prune_api import PruneChoice, PruneCriterion, PruneLayer
from mapsim.pruning import surgery
from mapsim.pruning.compensate import fold


@dataclass
class PruneOutcome:
    """A pruned copy of a model and what was done to it.

    Attributes:
        model: the pruned model (the input model is not modified).
        kept: layer path -> original indices of the kept maps, in the pruned model's order.
        removed: layer path -> original indices of the removed maps.
        compensation: layer path -> {removed map: {"partner", "a", "b"}} (original indices).
    """

    model: nn.Module
    kept: dict[str, list[int]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    compensation: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)


@torch.no_grad()
def layer_maps(model: nn.Module, index: int, images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float32 output maps of conv module ``index`` on ``images`` (eval mode)."""
    captured: list[torch.Tensor] = []
    handle = model.blocks[index].register_forward_hook(
        lambda _m, _i, out: captured.append(out.detach().float()))
    try:
        model.eval()
        for x in images.split(1):
            model(x)
    finally:
        handle.remove()
    return torch.cat(captured)


def layer_view(model: nn.Module, index: int, images: torch.Tensor) -> PruneLayer:
    """The :class:`PruneLayer` of conv module ``index`` on ``images``."""
    path, conv, bn = surgery.chain(model)[index]
    maps = layer_maps(model, index, images)
    flat = maps.transpose(0, 1).reshape(maps.shape[1], -1)
    return PruneLayer(path, conv.weight.detach().clone(),
                      None if conv.bias is None else conv.bias.detach().clone(),
                      bn.weight.detach().clone() if isinstance(bn, nn.BatchNorm2d) else None,
                      compute_moments(flat), maps)


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[int]:
    """Indices of the conv modules named by ``layers`` (``blocks.N``; None: all of them).

    :raises SpecError: an unknown layer, naming the prunable ones.
    """
    paths = [p for p, _, _ in surgery.chain(model)]
    if layers is None:
        return list(range(len(paths)))
    out = []
    for name in layers:
        if name not in paths:
            raise SpecError(f"layers: {name!r} is not a prunable layer of the model; the "
                            f"prunable layers are {', '.join(paths)}")
        out.append(paths.index(name))
    return sorted(set(out))


def removal_count(sparsity: float, n_maps: int) -> int:
    """Maps removed at ``sparsity`` (a fraction in [0, 1)): round(sparsity * n), at most n - 1."""
    if not 0 <= sparsity < 1:
        raise SpecError(f"sparsity: {sparsity} is outside [0, 1)")
    return min(int(round(sparsity * n_maps)), n_maps - 1)


def _check(choice: PruneChoice, layer: PruneLayer, n_remove: int | None, name: str) -> None:
    remove = set(choice.remove)
    if len(remove) != len(choice.remove) or any(not 0 <= j < layer.n_maps for j in remove):
        raise ValueError(f"criterion {name!r} returned invalid map indices {choice.remove} "
                         f"for {layer.name} ({layer.n_maps} maps)")
    if n_remove is not None and len(remove) != n_remove:
        raise ValueError(f"criterion {name!r} removed {len(remove)} maps of {layer.name}, "
                         f"not the {n_remove} asked for")
    if len(remove) >= layer.n_maps:
        raise ValueError(f"criterion {name!r} removed every map of {layer.name}")
    for j, i in choice.partners.items():
        if j not in remove or i in remove:
            raise ValueError(f"criterion {name!r}: partner {i} of map {j} in {layer.name} "
                             "must be a kept map and the map a removed one")


def prune_model(model: nn.Module, criterion: PruneCriterion, images: torch.Tensor, *,
                layers: Sequence[str] | None = None, sparsity: float | None = None,
                seed: int = 0) -> PruneOutcome:
    """Prune a copy of ``model`` with ``criterion``, layer by layer.

    Args:
        model: an fcn-shaped model (see :mod:`mapsim.pruning.surgery`).
        criterion: the criterion plugin.
        images: (N, C, H, W) calibration images (normalised as the model expects).
        layers: paths of the conv modules to prune (default: all).
        sparsity: fraction of each layer's maps to remove; None: the criterion decides (its
            threshold), which needs ``criterion.supports_threshold``.
        seed: seeds the ``rng`` the criterion gets (one stream per layer).
    """
    if sparsity is None and not criterion.supports_threshold:
        raise SpecError(f"criterion {criterion.name!r} needs a sparsity; only criteria with a "
                        "threshold (correlation) can prune without one")
    pruned = copy.deepcopy(model).eval()
    outcome = PruneOutcome(pruned)
    for index in resolve_layers(pruned, layers):
        layer = layer_view(pruned, index, images)
        n_remove = None if sparsity is None else removal_count(sparsity, layer.n_maps)
        rng = np.random.default_rng([seed, index])
        choice = criterion.choose(layer, n_remove, rng)
        _check(choice, layer, n_remove, criterion.name)
        keep = [k for k in range(layer.n_maps) if k not in set(choice.remove)]
        if choice.partners:
            record = fold(surgery.next_conv(pruned, index), choice.partners, layer.moments)
            outcome.compensation[layer.name] = record
        surgery.remove_maps(pruned, index, keep)
        outcome.kept[layer.name] = keep
        outcome.removed[layer.name] = sorted(choice.remove)
    return outcome
