"""The engine: from the captured maps of one image to similarity matrices.

Per image the selected maps of every model in a comparison group are stacked into one matrix Z
(C_total maps x P pixels); one call to :func:`mapsim.engine.moments.compute_moments` gives the
moments every moment-based metric reads, and each comparison's blocks are read off them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mapsim.errors import MapsimError, ShapeMismatchError
from mapsim.engine.align import mode_for, resample, target_size
from mapsim.engine.moments import Moments
from mapsim.types import Block, LayerValue, SimilarityMatrix
from mapsim.api import Metric, Undefined

DEAD_POLICIES = ("exclude", "original")


def layer_value(metric: Metric, model_a: str, layer_a: str, model_b: str, layer_b: str,
                result: object) -> LayerValue:
    """A metric's result for one layer pair as a row; a bare NaN is a plugin bug."""
    if isinstance(result, Undefined):
        return LayerValue(metric.label, model_a, layer_a, model_b, layer_b, float("nan"),
                          result.reason)
    value = float(result)
    if value != value:
        raise MapsimError(
            f"metric {metric.name!r} returned NaN for layers {model_a}.{layer_a} and "
            f"{model_b}.{layer_b} without a reason; a layer metric returns mapsim.Undefined("
            "reason) for undefined values. This is a bug in the metric plugin."
        )
    return LayerValue(metric.label, model_a, layer_a, model_b, layer_b, value,
                      p=float(getattr(result, "p", float("nan"))))


@dataclass
class MapStack:
    """The stacked maps of one image for a group of models that are compared together."""

    z: torch.Tensor
    blocks: list[Block]

    def rows(self, model: str) -> slice:
        """Rows of ``model`` in ``z``."""
        own = [b for b in self.blocks if b.model == model]
        return slice(own[0].start, own[-1].stop)

    def blocks_of(self, model: str) -> list[Block]:
        """Blocks of ``model`` with rows counted from the model's first row."""
        offset = self.rows(model).start
        return [b.shifted(offset) for b in self.blocks if b.model == model]


def comparison_groups(comparisons: Sequence[tuple[str, str]]) -> list[list[str]]:
    """Models linked by comparisons, as groups (each group shares one stacked matrix)."""
    parent: dict[str, str] = {}

    def find(m: str) -> str:
        parent.setdefault(m, m)
        while parent[m] != m:
            m = parent[m]
        return m

    for a, b in comparisons:
        parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for model in dict.fromkeys(m for pair in comparisons for m in pair):
        groups.setdefault(find(model), []).append(model)
    return list(groups.values())


def variances_only(activations: Mapping[str, Mapping[str, torch.Tensor]],
                   models: Sequence[str]) -> tuple[MapStack, Moments] | None:
    """The layout of ``models``' maps and moments with only each map's variance (the
    diagonal of the co-moments), computed layer by layer without stacking the maps: what the
    dead-map counts need when every metric works across images. None when the layers differ
    in size (or are not maps): :func:`stack_maps` then says why."""
    blocks: list[Block] = []
    means, squares = [], []
    for model in models:
        for layer, maps in activations[model].items():
            if maps.dim() != 3 or (blocks and tuple(maps.shape[1:]) != blocks[0].shape):
                return None
            row = blocks[-1].stop if blocks else 0
            blocks.append(Block(model, layer, row, row + int(maps.shape[0]),
                                (int(maps.shape[1]), int(maps.shape[2]))))
            mean, square = _mean_and_squares(maps.to(torch.float32))
            squares.append(square)
            means.append(mean)
    if not blocks:
        return None
    n = blocks[0].shape[0] * blocks[0].shape[1]
    z = torch.empty(blocks[-1].stop, 0, device=means[0].device)  # no pixels kept
    return MapStack(z, blocks), Moments(n, torch.cat(means), torch.diag(torch.cat(squares)))


#: pixels per chunk of :func:`_mean_and_squares`
VARIANCE_CHUNK = 4096


def _mean_and_squares(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each map's mean and centred sum of squares (float64), from one pass over the maps:
    float32 means and variances of chunks of :data:`VARIANCE_CHUNK` pixels
    (``torch.var_mean``), merged in float64 (Chan et al.). On a GPU, float64 reductions over
    whole maps ran at a fifth of the memory's speed; a constant map still gets exactly 0."""
    channels = maps.shape[0]
    if not maps.is_contiguous() and maps.permute(1, 2, 0).is_contiguous():
        pixels = maps.permute(1, 2, 0).reshape(-1, channels)  # channels-last: a view
    else:
        pixels = maps.reshape(channels, -1).T
    n = pixels.shape[0]
    whole = (n // VARIANCE_CHUNK) * VARIANCE_CHUNK
    parts = []  # (chunk variances, chunk means, pixels per chunk)
    if whole:
        var, mean = torch.var_mean(pixels[:whole].unflatten(0, (-1, VARIANCE_CHUNK)), dim=1,
                                   correction=0)
        parts.append((var, mean, VARIANCE_CHUNK))
    if whole < n:
        var, mean = torch.var_mean(pixels[whole:], dim=0, correction=0)
        parts.append((var[None], mean[None], n - whole))
    var = torch.cat([v.to(torch.float64) for v, _, _ in parts])
    means = torch.cat([m.to(torch.float64) for _, m, _ in parts])
    counts = torch.cat([torch.full((len(v),), float(c), dtype=torch.float64, device=v.device)
                        for v, _, c in parts])[:, None]
    mean = (counts * means).sum(dim=0) / n
    squares = (counts * var).sum(dim=0) + (counts * (means - mean).square()).sum(dim=0)
    return mean, squares


def stack_maps(
    activations: Mapping[str, Mapping[str, torch.Tensor]],
    models: Sequence[str],
    mask: torch.Tensor | None = None,
    align: Any = None,
) -> MapStack:
    """Stack the maps of ``models`` into one (C_total, P) matrix.

    ``activations[model][layer]`` is a (C, H, W) tensor. All layers must share H x W unless
    ``align`` (the spec's ``engine.align``) says how to resample them onto one grid
    (:mod:`mapsim.engine.align`); ``mask`` (H, W bool, on that grid) keeps only the pixels
    inside it.
    """
    items = []
    for model in models:
        for layer, maps in activations[model].items():
            if maps.dim() != 3:
                raise ShapeMismatchError(
                    f"layer {layer!r} of model {model!r} gives an output of shape "
                    f"{tuple(maps.shape)}; mapsim compares maps of shape (channels, height, width)."
                    " Choose convolutional layers (see `mapsim layers`)."
                )
            items.append((model, layer, maps))
    shapes = [(int(m.shape[1]), int(m.shape[2])) for _, _, m in items]
    size = None if align is None else target_size(align, shapes)
    blocks: list[Block] = []
    parts: list[torch.Tensor] = []
    first: Block | None = None
    row = 0
    for (model, layer, maps), shape in zip(items, shapes):
        if size is not None:
            maps = resample(maps, size, mode_for(align, shape, size))
            shape = size
        block = Block(model, layer, row, row + int(maps.shape[0]), shape)
        if first is not None and shape != first.shape:
            raise ShapeMismatchError(
                f"maps compared with each other must share a spatial size: layer "
                f"{first.layer!r} of model {first.model!r} is {_hw(first.shape)} but layer "
                f"{layer!r} of model {model!r} is {_hw(shape)}. Compare layers of equal "
                "resolution, feed inputs that give equal sizes, or set engine.align "
                "(smaller, larger or size: [H, W]) to resample the maps onto one grid."
            )
        first = first or block
        blocks.append(block)
        parts.append(maps.reshape(maps.shape[0], -1))
        row = block.stop
    z = torch.cat(parts, dim=0)
    if mask is not None:
        if tuple(mask.shape) != first.shape:
            hint = (" engine.roi needs the maps on the image's grid: with engine.align use "
                    "size: [H, W] of the image, or larger when the largest layer has the "
                    "image's size." if align is not None else "")
            raise ShapeMismatchError(
                f"the ROI mask is {_hw(tuple(mask.shape))} but the maps are "
                f"{_hw(first.shape)}.{hint}"
            )
        z = z[:, mask.reshape(-1).to(z.device)]
    return MapStack(z, blocks)


def _hw(shape: tuple[int, ...]) -> str:
    return " x ".join(str(s) for s in shape)


def apply_dead_policy(
    values: torch.Tensor,
    dead_a: torch.Tensor,
    dead_b: torch.Tensor,
    policy: str,
    fill: tuple[float, float] | None,
) -> torch.Tensor:
    """Mark (``exclude``) or fill (``original``: both dead, one dead) the pairs of dead maps."""
    check_dead_policy(policy, fill)
    if not bool(dead_a.any() | dead_b.any()):  # nothing to mark: no copy
        return values
    values = values.clone()
    one_dead = torch.nan if policy == "exclude" else fill[1]
    values[dead_a, :] = one_dead  # whole rows and columns: no (C_A x C_B) mask is built
    values[:, dead_b] = one_dead
    if policy == "original":
        values[torch.nonzero(dead_a)[:, 0, None], torch.nonzero(dead_b)[:, 0]] = fill[0]
    return values


def check_dead_policy(policy: str, fill: tuple[float, float] | None) -> None:
    """Refuse an unknown dead-map policy, or ``original`` for a metric without its rule."""
    if policy not in DEAD_POLICIES:
        raise MapsimError(f"unknown dead-map policy {policy!r}; use one of {DEAD_POLICIES}")
    if policy == "original" and fill is None:
        raise MapsimError("this metric has no original dead-map rule; use dead_maps: exclude")


def prepared_values(metric: Metric, stack: MapStack, moments: Moments, model_a: str,
                    model_b: str, dead: torch.Tensor,
                    dead_policy: str = "exclude") -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`map_similarity` computes and checks, done where the moments are without
    waiting for the device: the values with the dead-map policy applied, and a 0-dim flag
    that is True when a pair of live maps has no value (a bug in the metric).

    ``dead`` is ``metric.dead(moments, dead_std)``. Pass both to :func:`map_similarity`
    (``values=``, ``dead=``, ``undefined=``) once they are on the host.
    """
    check_dead_policy(dead_policy, metric.dead_fill)
    rows, cols = stack.rows(model_a), stack.rows(model_b)
    values = map_values(metric, stack, moments, model_a, model_b)
    dead_a, dead_b = dead[rows, None], dead[None, cols]
    either = dead_a | dead_b
    undefined = (torch.isnan(values) & ~either).any()
    if dead_policy == "exclude":
        values = values.masked_fill(either, torch.nan)
    else:
        both, one = metric.dead_fill
        values = values.masked_fill(either, one).masked_fill_(dead_a & dead_b, both)
    return values, undefined


def map_values(metric: Metric, stack: MapStack, moments: Moments, model_a: str,
               model_b: str) -> torch.Tensor:
    """The raw (C_A x C_B) float64 values of a map-granularity metric, where the moments are.

    Nothing is checked here, so on a GPU the built-in metrics queue their work without
    waiting for it (:func:`map_similarity` checks the values on the host).
    """
    rows, cols = stack.rows(model_a), stack.rows(model_b)
    if metric.uses_moments:
        values = metric.from_moments(moments, rows, cols)
    else:
        values = metric.from_maps(stack.z[rows], stack.z[cols])
    return values.to(torch.float64)


def map_similarity(
    metric: Metric,
    stack: MapStack,
    moments: Moments,
    model_a: str,
    model_b: str,
    *,
    dead_policy: str = "exclude",
    dead_std: float = 1e-10,
    values: torch.Tensor | None = None,
    dead: torch.Tensor | None = None,
    undefined: torch.Tensor | None = None,
) -> SimilarityMatrix:
    """The (C_A x C_B) matrix of a map-granularity metric between two models of a stack.

    ``values`` (from :func:`map_values`) and ``dead`` (``metric.dead(moments, dead_std)``)
    may be given when they were computed ahead, e.g. on a GPU while the host was busy;
    with ``undefined`` too, they come from :func:`prepared_values` (policy applied, values
    checked).
    """
    rows, cols = stack.rows(model_a), stack.rows(model_b)
    if values is None:
        values = map_values(metric, stack, moments, model_a, model_b)
    if dead is None:
        dead = metric.dead(moments, dead_std)
    values, dead = values.cpu(), dead.cpu()
    dead_a, dead_b = dead[rows], dead[cols]
    prepared = undefined is not None
    if not prepared or bool(undefined):
        _refuse_undefined(metric, values, dead_a, dead_b, model_a, model_b)
    if not prepared:
        values = apply_dead_policy(values, dead_a, dead_b, dead_policy, metric.dead_fill)
    return SimilarityMatrix(
        metric=metric.label,
        model_a=model_a,
        model_b=model_b,
        values=values.numpy(),
        blocks_a=stack.blocks_of(model_a),
        blocks_b=stack.blocks_of(model_b),
        dead_a=dead_a.numpy(),
        dead_b=dead_b.numpy(),
        higher_is_more_similar=metric.info.higher_is_more_similar,
    )


def _refuse_undefined(metric: Metric, values: torch.Tensor, dead_a: torch.Tensor,
                      dead_b: torch.Tensor, model_a: str, model_b: str) -> None:
    """Raise when a pair of live maps has no value (NaN): a bug in the metric plugin."""
    undefined = torch.isnan(values)
    if not bool(undefined.any()):
        return
    live = undefined[~dead_a][:, ~dead_b]
    if bool(live.any()):
        i, j = (int(k) for k in torch.nonzero(live)[0])
        i = int(torch.nonzero(~dead_a)[i])
        j = int(torch.nonzero(~dead_b)[j])
        raise MapsimError(
            f"metric {metric.name!r} returned an undefined value (NaN) for live maps "
            f"{model_a} map {i} and {model_b} map {j}; this is a bug in the metric plugin."
        )


def layer_similarity(
    metric: Metric, stack: MapStack, moments: Moments, model_a: str, model_b: str
) -> list[LayerValue]:
    """One value per (layer of A, layer of B) for a layer-granularity metric.

    Moment-based metrics give every layer pair in one :meth:`Metric.layers_from_moments` call.
    """
    blocks_a = [b for b in stack.blocks if b.model == model_a]
    blocks_b = [b for b in stack.blocks if b.model == model_b]
    rows = [slice(b.start, b.stop) for b in blocks_a]
    cols = [slice(b.start, b.stop) for b in blocks_b]
    if metric.uses_moments:
        table = metric.layers_from_moments(moments, rows, cols)
    else:
        table = [[metric.from_maps(stack.z[ra], stack.z[rb]) for rb in cols] for ra in rows]
    return [layer_value(metric, model_a, ba.layer, model_b, bb.layer, value)
            for ba, line in zip(blocks_a, table) for bb, value in zip(blocks_b, line)]
