"""The spatial null: each comparison again, with the partner's maps circularly shifted.

For every image and comparison ``(a, b)`` the partner side ``b`` (all its layers, by one
offset) is rolled circularly by a large random offset ``(dy, dx)`` and compared with ``a``
as the run compares them. A circular shift moves every pixel of a map by the same offset and
wraps the edges around, so each shifted map has exactly the values, mean, variance and
(circular) autocorrelation of the original, and b's maps keep their correlations with each
other; only the alignment with ``a`` is broken. The statistics of the shifted comparison are
what the statistic reads when the maps are unrelated but keep their spatial statistics:
the chance level (``baselines.csv``, ``map_pvalues.csv``; :mod:`mapsim.tables.chance`).

Within one network (``a == b``: map i against map j of the same image) the partner side is a
shifted copy of the same maps; a map is still never its own partner.

The offsets are drawn from ``numpy.random.default_rng([seed, image index, comparison
index])`` (:func:`null_offset`), uniformly between a quarter and three quarters of each side,
so they do not depend on which process or block computed the image. Without an ROI the
shifted comparison costs one extra cross product per comparison (the maps' own moments are
reused: a circular shift leaves them unchanged); with ``engine.roi`` the whole maps are
shifted before the mask is applied and the moments are computed afresh. On the streaming path
the maps come back, centred, from the moments buffer (:func:`null_comparisons` queues the
products where the maps are; :func:`null_similarities` reads the moments on the host).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mapsim.api import Metric
from mapsim.engine.moments import (
    Moments,
    chunk_size,
    chunked_products,
    compute_moments,
    exact_float32_matmul,
    row_sums,
)
from mapsim.engine.similarity import MapStack, map_similarity, stack_maps
from mapsim.types import Block, SimilarityMatrix

#: the name the shifted side takes inside the null stack (never a model name: it has a space)
SHIFTED = " shifted"
#: the tables of the shifted comparisons are written under this folder of the results
TABLE_PREFIX = "null/"
#: the only aggregators' tables written for them (the chance tables read nothing else)
TABLES = ("max", "pivot")
#: what run.json records about the null
DEFINITION = ("circular shift of the partner's maps (all its layers by one offset per image "
              "and comparison), offsets uniform in [H/4, 3H/4] x [W/4, 3W/4], drawn from "
              "numpy default_rng([seed, image index, comparison index]); one draw per image "
              "and comparison; within one network the partner side is a shifted copy of the "
              "same maps")


def null_offset(seed: int, image_index: int, comparison_index: int,
                shape: tuple[int, int]) -> tuple[int, int]:
    """The circular shift ``(dy, dx)`` of the partner's maps for one image and comparison:
    each uniform in [side/4, 3 side/4] (a large offset), from ``default_rng([seed, image
    index, comparison index])``; ``(0, 0)`` along a side of length 1."""
    rng = np.random.default_rng([int(seed), int(image_index), int(comparison_index)])
    out = []
    for side in shape:
        low, high = side // 4, (3 * side) // 4
        out.append(int(rng.integers(max(low, 1), max(high, 1) + 1)) if side > 1 else 0)
    return out[0], out[1]


def shift_rows(z: torch.Tensor, shape: tuple[int, int], offset: tuple[int, int]) -> torch.Tensor:
    """Rows of ``z`` (maps x H*W pixels) rolled circularly by ``offset`` on the H x W grid,
    as ``torch.roll`` over both axes does, in one pass: four rectangular copies (torch.roll
    makes one pass per axis; 69 against 38 ms for 320 maps of 256 x 256 on a 2-core CPU)."""
    height, width = shape
    dy, dx = offset[0] % height, offset[1] % width
    maps = z.reshape(-1, height, width)
    out = torch.empty_like(maps)
    for rows_to, rows_from in ((slice(dy, None), slice(0, height - dy)),
                               (slice(0, dy), slice(height - dy, None))):
        out[:, rows_to, dx:] = maps[:, rows_from, :width - dx]
        out[:, rows_to, :dx] = maps[:, rows_from, width - dx:]
    return out.reshape(z.shape[0], -1)


@dataclass
class NullSettings:
    """What the null needs of the spec: the seed and the engine's settings."""

    seed: int
    dead_maps: str
    dead_std: float
    chunk_pixels: int | None
    align: Any = None


def _renamed(blocks: list[Block], model: str) -> list[Block]:
    return [Block(model, b.layer, b.start, b.stop, b.shape) for b in blocks]


def null_group(maps: Mapping[str, Mapping[str, torch.Tensor]], stack: MapStack,
               moments: Moments, a: str, b: str, offset: tuple[int, int],
               mask: torch.Tensor | None, settings: NullSettings,
               centred: dict[str, torch.Tensor] | None = None, keep_z: bool = True,
               z_centred: bool = False) -> tuple[MapStack, Moments, str]:
    """The stack ``[a; b shifted]`` and its moments; the shifted side's model name.

    Without a mask the moments of each side are read off the group's (a circular shift does
    not change them) and only the cross block is computed, from a's centred maps (kept in
    ``centred`` for the next comparison of a) and b's, shifted; with a mask the whole maps
    are shifted, masked and their moments computed afresh. ``keep_z``: the stack holds the
    maps (metrics without a moments path read them), else no pixels. ``z_centred``: the
    stack's maps are already centred on their means (the streaming path's; no mask, no
    ``keep_z``), so no centred copy is made.
    """
    partner = b + SHIFTED if a == b else b
    rows_a, rows_b = stack.rows(a), stack.rows(b)
    blocks_a = [x.shifted(rows_a.start) for x in stack.blocks if x.model == a]
    n_a, n_b = rows_a.stop - rows_a.start, rows_b.stop - rows_b.start
    blocks_b = [Block(partner, x.layer, x.start - rows_b.start + n_a, x.stop - rows_b.start + n_a,
                      x.shape) for x in stack.blocks if x.model == b]
    shape = stack.blocks[0].shape
    if mask is None:
        centred = {} if centred is None else centred
        if z_centred:
            centred.setdefault(a, stack.z[rows_a])
        elif a not in centred:
            centred[a] = stack.z[rows_a].to(torch.float32) - \
                moments.mean[rows_a].to(torch.float32).unsqueeze(1)
        mean = torch.cat([moments.mean[rows_a], moments.mean[rows_b]])
        shifted = shift_rows(stack.z[rows_b].to(torch.float32), shape, offset)
        if not z_centred:
            shifted -= moments.mean[rows_b].to(torch.float32).unsqueeze(1)
        cross = cross_gram(centred[a], shifted, settings.chunk_pixels)
        comoment = torch.empty(n_a + n_b, n_a + n_b, dtype=torch.float64,
                               device=stack.z.device)
        comoment[:n_a, :n_a] = moments.comoment[rows_a, rows_a]
        comoment[n_a:, n_a:] = moments.comoment[rows_b, rows_b]
        comoment[:n_a, n_a:] = cross
        comoment[n_a:, :n_a] = cross.T
        if keep_z:
            z = torch.cat([stack.z[rows_a], shift_rows(stack.z[rows_b], shape, offset)])
        else:
            z = torch.empty(n_a + n_b, 0, device=stack.z.device)
        return MapStack(z, blocks_a + blocks_b), Moments(moments.n, mean, comoment), partner
    full = stack_maps(maps, list(dict.fromkeys(x.model for x in stack.blocks)), None,
                      align=settings.align).z  # the group's maps before the mask
    keep = mask.reshape(-1).to(full.device)
    z = torch.cat([full[rows_a][:, keep], shift_rows(full[rows_b], shape, offset)[:, keep]])
    return (MapStack(z, blocks_a + blocks_b),
            compute_moments(z, chunk_pixels=settings.chunk_pixels), partner)


def cross_gram(a: torch.Tensor, b: torch.Tensor, chunk_pixels: int | None) -> torch.Tensor:
    """float64 ``a @ b.T`` of two centred float32 (maps x pixels) matrices, summed over
    pixel chunks (:func:`mapsim.engine.moments.chunked_products`), with the small residual mean the
    float32 centring leaves taken out (``- n r_a r_b^T``)."""
    n = a.shape[1]
    step = chunk_size(a.shape[0] + b.shape[0], n, chunk_pixels)
    with exact_float32_matmul():
        out = chunked_products(a, b, step)
    res_a = row_sums(a) / n  # on the CPU through numpy: torch's float64 sums were 10x slower
    res_b = row_sums(b) / n
    return out - n * torch.outer(res_a, res_b)


@dataclass
class NullComparison:
    """One comparison of one image under the null: the stack ``[a; b shifted]`` (its pixels
    only when a metric reads them) and its moments; ``partner`` is the shifted side's name."""

    a: str
    b: str
    partner: str
    stack: MapStack
    moments: Moments


def null_comparisons(maps: Mapping[str, Mapping[str, torch.Tensor]], stack: MapStack,
                     moments: Moments, metrics: Sequence[Metric],
                     comparisons: Sequence[tuple[int, tuple[str, str]]], image_index: int,
                     mask: torch.Tensor | None, settings: NullSettings,
                     z_centred: bool = False) -> list[NullComparison]:
    """The shifted comparisons of one group on one image, computed where the maps are (no
    wait for the device): ``comparisons`` are ``(index in the run's comparisons, (a, b))``
    of this group; empty when no map metric is run. ``z_centred``: see :func:`null_group`."""
    chosen = [m for m in metrics if not m.accumulates and m.info.granularity == "map"]
    if not chosen:
        return []
    keep_z = not all(m.uses_moments for m in chosen)
    centred: dict[str, torch.Tensor] = {}  # each model's centred maps, for all its comparisons
    out = []
    for number, (a, b) in comparisons:
        offset = null_offset(settings.seed, image_index, number, stack.blocks[0].shape)
        null_stack, null_moments, partner = null_group(maps, stack, moments, a, b, offset,
                                                       mask, settings, centred, keep_z,
                                                       z_centred)
        out.append(NullComparison(a, b, partner, null_stack, null_moments))
    return out


def null_similarities(shifted: Sequence[NullComparison], metrics: Sequence[Metric],
                      settings: NullSettings) -> list[SimilarityMatrix]:
    """Every map metric's matrices of the shifted comparisons, in the directions the run
    itself reports (named as the run names them: ``model_b`` is the partner, whose maps were
    shifted)."""
    chosen = [m for m in metrics if not m.accumulates and m.info.granularity == "map"]
    out: list[SimilarityMatrix] = []
    for item in shifted:
        a, b, partner = item.a, item.b, item.partner
        for metric in chosen:
            directions = [(a, partner)]
            if a != b and not metric.info.symmetric:
                directions.append((partner, a))
            for x, y in directions:
                sim = map_similarity(metric, item.stack, item.moments, x, y,
                                     dead_policy=settings.dead_maps,
                                     dead_std=settings.dead_std)
                out.append(_named(sim, a, b, partner))
            if a != b and metric.info.symmetric:
                out.append(out[-1].transposed())
    return out


def null_matrices(maps: Mapping[str, Mapping[str, torch.Tensor]], stack: MapStack,
                  moments: Moments, metrics: Sequence[Metric],
                  comparisons: Sequence[tuple[int, tuple[str, str]]], image_index: int,
                  mask: torch.Tensor | None, settings: NullSettings) -> list[SimilarityMatrix]:
    """:func:`null_comparisons` and their :func:`null_similarities` at once."""
    shifted = null_comparisons(maps, stack, moments, metrics, comparisons, image_index, mask,
                               settings)
    return null_similarities(shifted, metrics, settings)


def _named(sim: SimilarityMatrix, a: str, b: str, partner: str) -> SimilarityMatrix:
    """The matrix with the shifted side named as the model it is (``b``)."""
    def name(model: str) -> str:
        return b if model == partner else model

    sim.model_a, sim.model_b = name(sim.model_a), name(sim.model_b)
    sim.blocks_a = _renamed(sim.blocks_a, name(sim.blocks_a[0].model)) if sim.blocks_a else []
    sim.blocks_b = _renamed(sim.blocks_b, name(sim.blocks_b[0].model)) if sim.blocks_b else []
    return sim
