"""The engine's fast path: moments built inside the forward hooks, one layer at a time.

When every metric of a run reads moments and every extractor can stream (the ``hooks``
extractor can), an image's maps are never stacked: each captured layer is centred into a
preallocated buffer and multiplied with the rows before it while the forward pass goes on
(:class:`mapsim.engine.moments.MomentsBuilder`), the activation is dropped at once, and the
forward pass stops after the last requested layer. The result equals
``compute_moments(stack_maps(...).z)`` to float32 rounding (tests/test_streaming.py).

The layout (rows and map sizes of each layer) is learnt from the first image of a given input
size by one extra forward pass that keeps only the output shapes (:func:`probe_layout`), so no
image ever holds all its maps twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mapsim.api import Extractor, Metric
from mapsim.devices import to_device
from mapsim.engine.moments import Moments, MomentsBuilder
from mapsim.engine.similarity import Block, MapStack
from mapsim.errors import ExtractionError


@dataclass
class Layout:
    """Where each (model, layer label) of a comparison group goes in the stacked rows."""

    blocks: list[Block]

    @classmethod
    def of(cls, stack: MapStack) -> Layout:
        """The layout of an ordinary stacked group."""
        return cls(list(stack.blocks))


def probe_layout(
    models: Sequence[str],
    run_model: Callable[[str, Callable[[str, torch.Tensor], None]], bool],
    labels: Mapping[str, Mapping[str, str]],
) -> Layout | None:
    """The layout of a group from one streamed forward pass that keeps only output shapes.

    None when a model cannot stream or an output is not one map tensor (the ordinary path
    then reports the problem).
    """
    blocks: list[Block] = []
    for model in models:
        def on_output(path: str, output: torch.Tensor, model: str = model) -> None:
            if output.dim() != 4 or output.shape[0] != 1:
                raise _LayoutChanged
            row = blocks[-1].stop if blocks else 0
            shape = (int(output.shape[2]), int(output.shape[3]))
            if blocks and shape != blocks[0].shape:
                raise _LayoutChanged
            blocks.append(Block(model, labels[model][path], row, row + int(output.shape[1]),
                                shape))

        try:
            if not run_model(model, on_output):
                return None
        except _LayoutChanged:
            return None
    return Layout(blocks) if blocks else None


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


def stream_group(
    layout: Layout,
    run_model: Callable[[str, Callable[[str, torch.Tensor], None]], bool],
    labels: Mapping[str, Mapping[str, str]],
    device: torch.device,
    mask: torch.Tensor | None = None,
    chunk_pixels: int | None = None,
    builder: MomentsBuilder | None = None,
) -> tuple[MapStack, Moments, MomentsBuilder] | None:
    """Moments of one image's group, built in the hooks; None when streaming is not possible.

    ``run_model(model, on_output)`` runs one model's forward pass with ``on_output`` called
    per captured layer path (returns False if it cannot stream). ``labels[model]`` maps a
    layer path to its label. ``builder`` (from the previous image) is reused when it fits.
    """
    n_maps = layout.blocks[-1].stop
    height, width = layout.blocks[0].shape
    n_pixels = height * width if mask is None else int(mask.sum())
    if builder is None or builder.n_maps != n_maps or builder.n_pixels != n_pixels:
        builder = MomentsBuilder(n_maps, n_pixels, device, **builder_settings(device,
                                                                             chunk_pixels))
    builder.reset()
    expected = iter(layout.blocks)
    flat_mask = None if mask is None else to_device(mask.reshape(-1), torch.device(device))

    for model in dict.fromkeys(b.model for b in layout.blocks):
        by_path = labels[model]

        def on_output(path: str, output: torch.Tensor, model: str = model) -> None:
            block = next(expected, None)
            label = by_path[path]
            if (block is None or block.model != model or block.layer != label
                    or output.dim() != 4 or output.shape[0] != 1
                    or (int(output.shape[1]), *block.shape) != tuple(output.shape[1:])):
                raise _LayoutChanged
            maps = output[0].reshape(output.shape[1], -1)
            if flat_mask is not None:
                maps = maps[:, flat_mask]
            builder.add(maps.to(torch.float32))

        try:
            if not run_model(model, on_output):
                return None
        except _LayoutChanged:
            return None
    if builder.filled != n_maps:
        raise ExtractionError("a requested layer did not run during the forward pass")
    stack = MapStack(torch.empty(n_maps, 0, device=device), list(layout.blocks))
    return stack, builder.finish(), builder
