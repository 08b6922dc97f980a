"""The engine's fast path: moments built inside the forward hooks, one layer at a time.

When every metric of a run reads moments and every extractor can stream (the ``hooks``
extractor can), an image's maps are never stacked: each captured layer is centred into a
preallocated buffer and multiplied with the rows before it while the forward pass goes on
(:class:`mapsim.engine.moments.MomentsBuilder`), the activation is dropped at once, and the
forward pass stops after the last requested layer. The result equals
``compute_moments(stack_maps(...).z)`` to float32 rounding (tests/test_streaming.py).

The layout (rows and map sizes of each layer) is learnt for each input size by
:func:`probe_layout`, which keeps only the output shapes. The image step runs it on a copy of
the models on PyTorch's ``meta`` device (shapes without arithmetic: no extra forward pass), and
only for a model that cannot run there on the real device (one extra forward pass for the first
image of the size); either way no image ever holds all its maps twice.

Outputs that are not maps yet are made maps inside the hook, exactly as the plain path makes
them: ``convert`` reads a transformer's (1, L, D) tokens as D maps on the patch grid
(:func:`mapsim.models.tokens.token_maps`), and with ``engine.align`` each layer is resampled
to the group's grid (:mod:`mapsim.engine.align`: the target size is decided from every layer's
size when the layout is probed) before its rows are added, so aligned and token runs stream
too; only one layer's resampled maps exist at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mapsim.api import Extractor, Metric
from mapsim.devices import to_device
from mapsim.engine.align import mode_for, resample, target_size
from mapsim.engine.moments import Moments, MomentsBuilder
from mapsim.engine.similarity import Block, MapStack
from mapsim.errors import ExtractionError, MapsimError

#: ``convert(model, path, output)``: a captured output as (1, C, H, W) maps where it can be
#: (token outputs), else the output unchanged
Convert = Callable[[str, str, torch.Tensor], torch.Tensor]


@dataclass
class Layout:
    """Where each (model, layer label) of a comparison group goes in the stacked rows.

    ``blocks`` are in the order of the models' layer labels, as the plain path stacks them,
    and hold the maps' size in the rows (the aligned grid with ``engine.align``); ``sources``
    the size each layer's output has before alignment (the same without it); ``fired`` the
    index in ``blocks`` of each output in the order the hooks see them (a U-Net runs
    ``decoder.1`` before ``decoder.0``).
    """

    blocks: list[Block]
    sources: list[tuple[int, int]] | None = None
    fired: list[int] | None = None

    def __post_init__(self) -> None:
        if self.sources is None:
            self.sources = [b.shape for b in self.blocks]
        if self.fired is None:
            self.fired = list(range(len(self.blocks)))

    @classmethod
    def of(cls, stack: MapStack, maps: Mapping[str, Mapping[str, torch.Tensor]] | None = None
           ) -> Layout:
        """The layout of an ordinary stacked group; ``maps`` ({model: {label: (C, H, W)}},
        before alignment) give the sources' sizes."""
        sources = None if maps is None else [
            (int(maps[b.model][b.layer].shape[-2]), int(maps[b.model][b.layer].shape[-1]))
            for b in stack.blocks]
        return cls(list(stack.blocks), sources)


def probe_layout(
    models: Sequence[str],
    run_model: Callable[[str, Callable[[str, torch.Tensor], None]], bool],
    labels: Mapping[str, Mapping[str, str]],
    convert: Convert | None = None,
    align: Any = None,
    batch: int = 1,
) -> Layout | None:
    """The layout of a group from one streamed forward pass that keeps only output shapes
    (of an input of ``batch`` images: 1, or 0 for an empty batch).

    ``convert`` makes token outputs maps; with ``align`` (an ``AlignSpec``) the blocks get the
    grid that :func:`mapsim.engine.align.target_size` picks from all layers' sizes. None when
    a model cannot stream, an output is not one map tensor, or sizes differ without
    ``align`` (the ordinary path then reports the problem).
    """
    found: list[tuple[str, str, int, tuple[int, int]]] = []
    for model in models:
        def on_output(path: str, output: torch.Tensor, model: str = model) -> None:
            output = _converted(convert, model, path, output)
            if output.dim() != 4 or output.shape[0] != batch:
                raise _LayoutChanged
            shape = (int(output.shape[2]), int(output.shape[3]))
            if align is None and found and shape != found[0][3]:
                raise _LayoutChanged
            found.append((model, labels[model][path], int(output.shape[1]), shape))

        try:
            if not run_model(model, on_output):
                return None
        except _LayoutChanged:
            return None
    if not found:
        return None
    size = None if align is None else target_size(align, [f[3] for f in found])
    rank = {(m, label): (i, j) for i, m in enumerate(models)
            for j, label in enumerate(labels[m].values())}
    order = sorted(range(len(found)), key=lambda k: rank[found[k][:2]])
    blocks: list[Block] = []
    for k in order:
        model, label, n_maps, shape = found[k]
        row = blocks[-1].stop if blocks else 0
        blocks.append(Block(model, label, row, row + n_maps, size or shape))
    fired = [order.index(k) for k in range(len(found))]
    return Layout(blocks, [found[k][3] for k in order], fired)


def builder_settings(device: torch.device | str, chunk_pixels: int | None) -> dict:
    """How the moments are built on ``device`` (from benchmarks/gpu_similarity.py on an
    H100: products of 128-row blocks after the forward pass, chunks of 2048 pixels, stored
    pixel-major like the channels-last activations; on CPUs each layer's products are made in
    its hook)."""
    if torch.device(device).type == "cuda":
        return {"chunk_pixels": chunk_pixels or 2048, "block_rows": 128, "pixel_major": True}
    return {"chunk_pixels": chunk_pixels, "block_rows": None}


def can_stream(extractors: Sequence[Extractor], metrics: Sequence[Metric]) -> bool:
    """True when every metric reads plain moments (no per-layer pixel statistics, which
    debiased CKA needs) and every extractor implements :meth:`mapsim.Extractor.stream`."""
    return (all(m.uses_moments and not m.needs_layer_norms for m in metrics)
            and all(e.can_stream() for e in extractors))


class _LayoutChanged(Exception):
    pass


def _converted(convert: Convert | None, model: str, path: str, output: torch.Tensor
               ) -> torch.Tensor:
    """``convert``'s maps; a refusal (e.g. tokens off the grid) leaves the image to the
    ordinary path, which reports it."""
    if convert is None:
        return output
    try:
        return convert(model, path, output)
    except MapsimError:
        raise _LayoutChanged from None


def stream_group(
    layout: Layout,
    run_model: Callable[[str, Callable[[str, torch.Tensor], None]], bool],
    labels: Mapping[str, Mapping[str, str]],
    device: torch.device,
    mask: torch.Tensor | None = None,
    chunk_pixels: int | None = None,
    builder: MomentsBuilder | None = None,
    convert: Convert | None = None,
    align: Any = None,
) -> tuple[MapStack, Moments, MomentsBuilder] | None:
    """Moments of one image's group, built in the hooks; None when streaming is not possible.

    ``run_model(model, on_output)`` runs one model's forward pass with ``on_output`` called
    per captured layer path (returns False if it cannot stream). ``labels[model]`` maps a
    layer path to its label. ``builder`` (from the previous image) is reused when it fits.
    ``convert`` and ``align`` make each output the maps the plain path would stack (token
    maps; resampled to the layout's grid as :func:`mapsim.engine.similarity.stack_maps`
    does).
    """
    n_maps = layout.blocks[-1].stop
    height, width = layout.blocks[0].shape
    if mask is not None and tuple(mask.shape) != (height, width):
        return None  # the ordinary path says why the ROI does not fit the maps
    n_pixels = height * width if mask is None else int(mask.sum())
    if builder is None or builder.n_maps != n_maps or builder.n_pixels != n_pixels:
        builder = MomentsBuilder(n_maps, n_pixels, device, **builder_settings(device,
                                                                             chunk_pixels))
    builder.reset()
    expected = iter([(layout.blocks[i], layout.sources[i]) for i in layout.fired])
    flat_mask = None if mask is None else to_device(mask.reshape(-1), torch.device(device))

    for model in dict.fromkeys(layout.blocks[i].model for i in layout.fired):
        by_path = labels[model]

        def on_output(path: str, output: torch.Tensor, model: str = model) -> None:
            block, source = next(expected, (None, None))
            label = by_path[path]
            output = _converted(convert, model, path, output)
            if (block is None or block.model != model or block.layer != label
                    or output.dim() != 4 or output.shape[0] != 1
                    or (block.n_maps, *source) != tuple(output.shape[1:])):
                raise _LayoutChanged
            maps = output[0]
            if align is not None and source != block.shape:
                maps = resample(maps.float(), block.shape, mode_for(align, source, block.shape))
            maps = maps.reshape(maps.shape[0], -1)
            if flat_mask is not None:
                maps = maps[:, flat_mask]
            builder.add(maps)  # float32, or half precision that the builder widens

        try:
            if not run_model(model, on_output):
                return None
        except _LayoutChanged:
            return None
    if builder.filled != n_maps:
        raise ExtractionError("a requested layer did not run during the forward pass")
    stack = MapStack(torch.empty(n_maps, 0, device=device), list(layout.blocks))
    return stack, _in_block_order(builder.finish(), layout), builder


def _block_order(layout: Layout, device: torch.device) -> torch.Tensor | None:
    """The builder's rows (in hook order) in the layout's block order; None when the hooks
    fire in block order."""
    if layout.fired == sorted(layout.fired):
        return None
    start, rows = 0, {}
    for i in layout.fired:
        rows[i] = range(start, start + layout.blocks[i].n_maps)
        start += layout.blocks[i].n_maps
    return torch.tensor([r for i in range(len(layout.blocks)) for r in rows[i]], device=device)


def _in_block_order(moments: Moments, layout: Layout) -> Moments:
    """The builder's rows (in hook order) put in the layout's block order."""
    perm = _block_order(layout, moments.mean.device)
    if perm is None:
        return moments
    return Moments(moments.n, moments.mean[perm], moments.comoment[perm][:, perm])


def streamed_maps(builder: MomentsBuilder, layout: Layout) -> MapStack:
    """The group's maps centred on their means, back from the moments buffer
    (:meth:`MomentsBuilder.maps`), stacked as the plain path stacks them (the layout's block
    order): what the spatial null shifts when the run streams. Only for maps without an ROI
    (the buffer holds the masked pixels)."""
    z = builder.maps(centred=True)
    perm = _block_order(layout, z.device)
    return MapStack(z if perm is None else z[perm], list(layout.blocks))
