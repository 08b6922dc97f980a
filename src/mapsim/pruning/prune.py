"""Pruning a model layer by layer with a criterion.

For each layer in order (module order), the current network -- already pruned and compensated
in the layers before -- runs on the calibration images; the layer's output maps (after the
ReLU of its conv module) give its :class:`~mapsim.Moments` (the engine's ``compute_moments``,
float64) and the :class:`~mapsim.PruneLayer` the criterion sees. The criterion's choice is
applied: first the compensation (if it names partners,
:func:`~mapsim.pruning.compensate.fold` into every convolution that reads the maps directly),
then the structural removal through the model's :mod:`~mapsim.pruning.graph` (Torch-Pruning's
dependency graph, or the fcn chain without it).
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
from mapsim.pruning.compensate import affine_fit, fold
from mapsim.pruning.graph import Layer, make_graph


@dataclass
class PruneOutcome:
    """A pruned copy of a model and what was done to it.

    Attributes:
        model: the pruned model (the input model is not modified).
        kept: layer path -> original indices of the kept maps, in the pruned model's order.
        removed: layer path -> original indices of the removed maps.
        compensation: layer path -> {removed map: {"partner", "a", "b"}} (original indices).
        uncompensated: layer path -> the layers reading its maps other than directly (e.g.
            through a pooling), into which nothing was folded.
        channels: module path -> {"out", "in"}: original indices of every channel of every
            convolution, linear layer and batch norm (the kept -> original mapping).
        widths: module path -> channel attributes of the modules that changed (what a saved
            pruned model's card needs to rebuild it).
    """

    model: nn.Module
    kept: dict[str, list[int]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    compensation: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    uncompensated: dict[str, list[str]] = field(default_factory=dict)
    channels: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    widths: dict[str, dict[str, Any]] = field(default_factory=dict)


@torch.no_grad()
def layer_maps(model: nn.Module, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float32 output maps of ``module`` (a part of ``model``) on ``images``."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda _m, _i, out: captured.append(out.detach().float()))
    try:
        model.eval()
        for x in images.split(1):
            model(x)
    finally:
        handle.remove()
    return torch.cat(captured)


def layer_view(model: nn.Module, path: str, images: torch.Tensor, graph: Any = None,
               layer: Layer | None = None) -> PruneLayer:
    """The :class:`PruneLayer` of the prunable layer ``path`` on ``images``."""
    graph = graph or make_graph(model, images[:1])
    layer = layer or graph.layer(path)
    maps = layer_maps(model, layer.module, images)
    conv = layer.conv
    if maps.dim() != 4 or maps.shape[1] != conv.out_channels:
        raise SpecError(f"layers: {path!r} outputs {tuple(maps.shape[1:])} maps, not the "
                        f"{conv.out_channels} of its convolution {layer.conv_path}; name the "
                        "conv module itself")
    weight = conv.weight.detach().clone()
    if isinstance(conv, nn.ConvTranspose2d):
        weight = weight.transpose(0, 1).contiguous()
    flat = maps.transpose(0, 1).reshape(maps.shape[1], -1)
    return PruneLayer(path, weight, None if conv.bias is None else conv.bias.detach().clone(),
                      None if layer.bn is None else layer.bn.weight.detach().clone(),
                      compute_moments(flat), maps)


def resolve_layers(graph: Any, layers: Sequence[str] | None) -> list[str]:
    """The prunable layers named by ``layers`` (None: the graph's default), in module order.

    :raises SpecError: an unknown layer, naming the closest and the prunable ones.
    """
    if layers is None:
        return graph.candidates()
    for name in layers:
        graph.layer(name)
    order = {p: k for k, (p, _) in enumerate(graph.model.named_modules())}
    return sorted(set(layers), key=lambda p: order.get(p, len(order)))


def affine(moments: Any, kept: int, removed: int) -> dict[str, float]:
    """``{"a", "b"}`` of :func:`~mapsim.pruning.compensate.affine_fit`."""
    a, b = affine_fit(moments, kept, removed)
    return {"a": a, "b": b}


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
                seed: int = 0, backend: str = "auto") -> PruneOutcome:
    """Prune a copy of ``model`` with ``criterion``, layer by layer.

    Args:
        model: a model Torch-Pruning can trace (or, without it, an fcn chain).
        criterion: the criterion plugin.
        images: (N, C, H, W) calibration images (normalised as the model expects); the first
            one is the example input the dependency graph is traced with.
        layers: module paths of the layers to prune (default: every layer whose maps another
            layer reads; see :mod:`mapsim.pruning.graph`).
        sparsity: fraction of each layer's maps to remove; None: the criterion decides (its
            threshold), which needs ``criterion.supports_threshold``.
        seed: seeds the ``rng`` the criterion gets (one stream per layer).
        backend: ``auto``, ``torch-pruning`` or ``chain`` (:func:`make_graph`).

    :raises SpecError: unknown layer, sparsity outside [0, 1), a removal that disconnects.
    :raises ModelError: a model that cannot be traced.
    """
    if sparsity is None and not criterion.supports_threshold:
        raise SpecError(f"criterion {criterion.name!r} needs a sparsity; only criteria with a "
                        "threshold (correlation) can prune without one")
    if sparsity is not None:
        removal_count(sparsity, 1)
    pruned = copy.deepcopy(model).eval()
    graph = make_graph(pruned, images[:1], backend)
    outcome = PruneOutcome(pruned)
    for index, path in enumerate(resolve_layers(graph, layers)):
        layer = graph.layer(path)
        view = layer_view(pruned, path, images, graph, layer)
        original = graph.original[layer.conv_path][0]
        done = original - view.n_maps
        n_remove = None if sparsity is None else \
            max(0, removal_count(sparsity, original) - done)
        rng = np.random.default_rng([seed, index])
        choice = criterion.choose(view, n_remove, rng)
        _check(choice, view, n_remove, criterion.name)
        numbering = graph.channels[layer.conv_path]["out"]
        if choice.partners:
            into, skipped = [], []
            consumers = graph.consumers(layer)
            graph.direct_check(layer, consumers, images[:1])
            for c in consumers:
                if c.direct:
                    fold(c.module, choice.partners, view.moments, c.index)
                    into.append(c.path)
                else:
                    skipped.append(c.path)
            outcome.compensation[path] = {
                numbering[j]: {"partner": numbering[i], **affine(view.moments, i, j),
                               "into": into}
                for j, i in sorted(choice.partners.items())}
            if skipped:
                outcome.uncompensated[path] = skipped
        if choice.remove:
            graph.remove(layer, list(choice.remove))
        outcome.kept[path] = list(graph.channels[layer.conv_path]["out"])
        outcome.removed[path] = sorted(numbering[j] for j in choice.remove)
    outcome.channels = graph.channels
    outcome.widths = graph.widths()
    return outcome
