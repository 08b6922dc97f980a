"""One image in, an :class:`ImageResult` out: maps -> moments -> every metric's values.

:class:`ImageStep` holds what the per-image work needs (the prepared models, the metrics, the
comparison groups and the engine settings) and nothing of a run: no sinks, no blocks, no
pictures. The runner (:mod:`mapsim.runner.run`) decides where the frames and matrices of an
:class:`ImageResult` go.

Two paths give the same result:

* :meth:`ImageStep.compute` extracts the maps, stacks each comparison group's maps into one
  matrix and computes its moments with one product;
* :meth:`ImageStep.launch` / :meth:`ImageStep.complete` (the fast path,
  :mod:`mapsim.engine.streaming`) build the moments inside the extractor's hooks without
  keeping the maps; on a GPU the launch only queues work, and the values are copied to the
  host without waiting, so the device computes one image while the host finishes the last.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from mapsim.api import ImageItem, Metric
from mapsim.devices import to_device
from mapsim.engine.align import align_label
from mapsim.engine.image_result import (
    DeadCount,
    DeadKey,
    DirectionValues,
    GroupMoments,
    ImageResult,
    LaunchedImage,
    Maps,
    PreparedValues,
)
from mapsim.engine.moments import compute_moments, variance_moments
from mapsim.models.tokens import token_maps
from mapsim.engine.precision import (
    PendingProbe,
    differs_from_exact,
    forward_precision,
    largest_differences,
    layer_correlations,
)
from mapsim.engine.similarity import (
    MapStack,
    comparison_groups,
    layer_similarity,
    layer_value,
    map_similarity,
    prepared_values,
    stack_maps,
    variances_only,
)
from mapsim.engine.null import NullComparison, NullSettings, null_comparisons, null_similarities
from mapsim.engine.streaming import (
    Layout,
    can_stream,
    probe_layout,
    stream_group,
    streamed_maps,
)
from mapsim.errors import ExtractionError, ImageError, MapsimError
from mapsim.io.images import roi_mask
from mapsim.models.prepare import PreparedModel
from mapsim.types import LayerValue, Moments

#: the image column of the tables computed from the moments pooled over all images
POOLED_IMAGE = "pooled"
#: the image column of rows computed across all images (:class:`mapsim.ImagesMetric`)
ACROSS_IMAGES = "all-images"

def layer_frame(image_id: str, values: list[LayerValue], aligned: str | None = None
                ) -> pd.DataFrame:
    """Rows of ``layer_similarity.csv`` for one image (or ``all-images``, ``pooled``), with
    an ``aligned`` column when the maps were aligned (``engine.align``)."""
    frame = pd.DataFrame([v.__dict__ for v in values])
    frame.insert(0, "image", image_id)
    if aligned is not None:
        frame.insert(1, "aligned", aligned)
    return frame


def _on_host(item: NullComparison) -> NullComparison:
    """A shifted comparison with its moments copied to the host without waiting (its stack
    holds no pixels on the streaming path)."""
    moments = item.moments
    return NullComparison(item.a, item.b, item.partner,
                          MapStack(torch.empty(item.stack.z.shape[0], 0), item.stack.blocks),
                          Moments(moments.n, _to_host(moments.mean), _to_host(moments.comoment)))


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy that does not wait for the device (valid once the work queued before it
    is done)."""
    return tensor.to("cpu", non_blocking=True)


class ImageStep:
    """The per-image work of a run (see the module docstring)."""

    def __init__(self, models: Mapping[str, PreparedModel], metrics: list[Metric],
                 comparisons: list[tuple[str, str]], engine: Any, device: torch.device,
                 timings: dict[str, float]) -> None:
        self.models = dict(models)
        self.metrics = metrics
        self.comparisons = comparisons
        self.groups = comparison_groups(comparisons)
        self.engine = engine
        self.device = device
        self.timings = timings
        self.layouts: dict[tuple, Layout] = {}  # (group, image shape) -> layout, fast path
        self.builders: dict[int, Any] = {}
        self.meta_modules: dict[str, torch.nn.Module] = {}  # shapes-only copies (layouts)
        self.aligned_sizes: dict[tuple[str, ...], set[tuple[int, int]]] = {}  # engine.align
        #: the spatial null's settings (None: off); set by the runner from the spec
        self.null: NullSettings | None = None

    # ------------------------------------------------------------------ inputs
    def extract(self, item: ImageItem, precision: str | None = None) -> Maps:
        """Capture the chosen layers of every model for one image: {model: {label: (C,H,W)}},
        float32, the forward pass run under ``precision`` (default: the spec's policy)."""
        image = self.input(item)
        out = {}
        for name, model in self.models.items():
            with forward_precision(precision or self.engine.precision, self.device):
                captured = model.extractor.extract(model.loaded.module,
                                                   list(model.layers.values()), image)
            maps = {}
            for label, path in model.layers.items():
                tensor = captured[path]
                if tensor.dim() == 3 and model.tokens is not None:  # transformer tokens
                    tensor = token_maps(tensor, model.tokens, path)
                if tensor.dim() != 4 or tensor.shape[0] != 1:
                    hint = (f" For transformer tokens (batch, tokens, channels) set "
                            f"models.{name}.tokens: auto (or {{grid: [rows, cols]}})."
                            if tensor.dim() == 3 else "")
                    raise ExtractionError(
                        f"layer {path!r} of model {name!r} gives an output of shape "
                        f"{tuple(tensor.shape)}; mapsim compares maps of shape "
                        "(1, channels, height, width). Choose convolutional layers "
                        f"(see `mapsim layers`).{hint}"
                    )
                maps[label] = tensor[0].float()  # autocast outputs are half precision
            out[name] = maps
        return out

    def input(self, item: ImageItem) -> torch.Tensor:
        """The image as a (1, C, H, W) tensor on the device, checked against every model."""
        image = to_device(torch.from_numpy(np.ascontiguousarray(item.image)), self.device)[None]
        for name, model in self.models.items():
            expected = model.loaded.in_channels
            if expected is not None and image.shape[1] != expected:
                raise ImageError(
                    f"image {item.id} has {image.shape[1]} channel(s) but model {name!r} expects "
                    f"{expected}; set the dataset's 'color' (e.g. rgb or luminance)."
                )
        return image

    def mask_for(self, item: ImageItem) -> torch.Tensor | None:
        """The ROI mask of an image, if the spec asks for one."""
        roi = self.engine.roi
        if roi is None:
            return None
        if item.label is None:
            raise ImageError(
                f"engine.roi needs a label for image {item.id}, but the dataset gave none; "
                "add 'labels' to the images entry or remove engine.roi"
            )
        return torch.from_numpy(roi_mask(item.label, roi.dilate, source=item.source))

    def probe_precision(self, item: ImageItem) -> PendingProbe:
        """What the precision policy costs on ``item``: per model and layer, the largest
        |delta r| against an ``exact`` forward pass (see :mod:`mapsim.engine.precision`),
        queued on the device; :meth:`PendingProbe.read` waits for it."""
        policy = self.engine.precision
        if not differs_from_exact(policy, self.device):
            return PendingProbe(note={"skipped": f"{policy} on {self.device.type} computes "
                                                 "as exact does"})
        # each pass is reduced to its correlations before the next runs: one set of maps
        policy_r = layer_correlations(self.extract(item))
        exact_r = layer_correlations(self.extract(item, precision="exact"))
        return PendingProbe(item.id, largest_differences(policy_r, exact_r))

    def release_buffers(self) -> None:
        """Drop the moments buffers the fast path reuses from image to image (after the
        last image: the memory goes back to the allocator)."""
        self.builders.clear()

    # ------------------------------------------------------------------ the plain path
    def compute(self, item: ImageItem, keep_maps: bool = False,
                index: int | None = None) -> ImageResult:
        """Everything for one image, with its maps kept in memory. ``index``: the image's
        place in the run, which seeds the spatial null (needed when it is on)."""
        try:
            return self._compute(item, keep_maps, index)
        except torch.cuda.OutOfMemoryError as exc:
            raise self._out_of_memory(item) from exc

    def _compute(self, item: ImageItem, keep_maps: bool, index: int | None = None
                 ) -> ImageResult:
        start = time.perf_counter()
        maps = self.extract(item)
        mask = self.mask_for(item)
        self._sync()
        self.timings["forward"] += time.perf_counter() - start
        for metric in self.metrics:
            if metric.accumulates:
                metric.update(item.id, maps, mask)
        norms = any(m.needs_layer_norms for m in self.metrics)
        result = ImageResult(item.id, maps=maps if keep_maps else None)
        for number, models in enumerate(self.groups):
            start = time.perf_counter()
            # metrics over images only: the dead-map flags need the variances alone (and the
            # spatial null, which shifts map metrics' partners, has nothing to do)
            alone = (mask is None and all(m.accumulates for m in self.metrics)
                     and getattr(self.engine, "align", None) is None)
            done = variances_only(maps, models) if alone else None
            if done is not None:
                stack, moments = done
            else:
                stack = stack_maps(maps, models, None if mask is None else mask.to(self.device),
                                   align=self.engine.align)
                moments = compute_moments(
                    stack.z, chunk_pixels=self.engine.chunk_pixels,
                    layers=[(b.start, b.stop) for b in stack.blocks] if norms else None
                ) if not alone else variance_moments(stack.z)
            self._sync()
            self.timings["moments"] += time.perf_counter() - start
            if self.streamable:
                self.layouts[(number, item.image.shape)] = Layout.of(stack, maps)
            group = GroupMoments(number, models, stack, moments, moments)
            self.values(item.id, group, result)
            result.groups.append(group)
            if self.null is not None:
                shifted = self._shifted(maps, stack, moments, models, index,
                                        None if mask is None else mask.to(self.device))
                start = time.perf_counter()
                result.null.extend(null_similarities(shifted, self.metrics, self.null))
                self.timings["null"] += time.perf_counter() - start
        return result

    def _shifted(self, maps: Maps, stack: MapStack, moments: Moments, models: list[str],
                 index: int | None, mask: torch.Tensor | None, z_centred: bool = False
                 ) -> list[NullComparison]:
        """The spatial null's shifted comparisons of one group (queued on the device)."""
        if index is None:
            raise MapsimError("the spatial null needs the image's index in the run")
        start = time.perf_counter()
        mine = [(i, pair) for i, pair in enumerate(self.comparisons) if pair[0] in models]
        out = null_comparisons(maps, stack, moments, self.metrics, mine, index, mask, self.null,
                               z_centred)
        self.timings["null"] += time.perf_counter() - start
        return out

    # ------------------------------------------------------------------ the fast path
    @property
    def streamable(self) -> bool:
        """Whether images can take the fast path (every metric reads plain moments and every
        extractor streams; see :mod:`mapsim.engine.streaming`)."""
        # engine.align and token maps stream too: the hooks reshape / resample each output
        # (mapsim.engine.streaming). The spatial null shifts the maps, which the fast path
        # takes back from its moments buffer (resampled onto the aligned grid, as the plain
        # path stacks and shifts them).
        return can_stream([m.extractor for m in self.models.values()], self.metrics)

    def launch(self, item: ImageItem, index: int | None = None) -> LaunchedImage | None:
        """Start one image on the fast path; None when it cannot take it. ``index``: the
        image's place in the run (seeds the spatial null)."""
        if not self.streamable:
            return None
        try:
            return self._launch(item, index)
        except torch.cuda.OutOfMemoryError as exc:
            raise self._out_of_memory(item) from exc

    def _launch(self, item: ImageItem, place: int | None = None) -> LaunchedImage | None:
        start = time.perf_counter()
        began = None
        if self.device.type == "cuda":
            began = torch.cuda.Event(enable_timing=True)
            began.record()
        image = self.input(item)
        mask = self.mask_for(item)
        if self.null is not None and mask is not None:
            return None  # the buffer holds the ROI's pixels only: the plain path shifts maps

        def run_model(name: str, on_output: Any) -> bool:
            model = self.models[name]
            with forward_precision(self.engine.precision, self.device):
                return model.extractor.stream(model.loaded.module,
                                              list(model.layers.values()), image, on_output)

        def convert(name: str, path: str, output: torch.Tensor) -> torch.Tensor:
            tokens = self.models[name].tokens  # transformer tokens, as extract() reads them
            return output if tokens is None or output.dim() != 3 else token_maps(output,
                                                                                 tokens, path)

        align = getattr(self.engine, "align", None)
        groups, shifted = [], []
        for index, models in enumerate(self.groups):
            labels = {n: {p: lb for lb, p in self.models[n].layers.items()} for n in models}
            key = (index, item.image.shape)
            if key not in self.layouts:  # first image of this size: learn the layout
                layout = self._probe(models, run_model, labels, convert, align, image)
                if layout is None:
                    return None
                self.layouts[key] = layout
            out = stream_group(self.layouts[key], run_model, labels, self.device, mask,
                               self.engine.chunk_pixels, self.builders.get(index), convert,
                               align)
            if out is None:
                return None
            stack, moments, self.builders[index] = out
            layout = MapStack(torch.empty(stack.z.shape[0], 0), stack.blocks)
            prepared = self._prepare(models, stack, moments)
            host = Moments(moments.n, _to_host(moments.mean), _to_host(moments.comoment))
            groups.append(GroupMoments(index, models, layout, host, moments, prepared))
            if self.null is not None:
                maps = streamed_maps(self.builders[index], self.layouts[key])
                shifted += [_on_host(c) for c in self._shifted({}, maps, moments, models, place,
                                                               None, True)]
        ended = None
        if self.device.type == "cuda":
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
        seconds = time.perf_counter() - start
        self.timings["forward_and_moments"] += seconds
        self.timings["launch"] += seconds
        return LaunchedImage(item.id, groups, began, ended, shifted)

    def _probe(self, models: list[str], run_model: Any, labels: Any, convert: Any, align: Any,
               image: torch.Tensor) -> Layout | None:
        """A group's layout at ``image``'s size, from output shapes alone (no extra forward
        pass): first the models run on an empty batch on their own device (no arithmetic and
        no imports), then, for a model that cannot take an empty batch, a copy of it on
        PyTorch's ``meta`` device (whose first use imports parts of torch: about 1.3 s on a
        2-core CPU); for a model that runs on neither (it reads values on the way), from one
        streamed forward pass that keeps only the shapes. A wrong layout cannot give wrong
        numbers: the streaming pass checks every output against it."""
        start = time.perf_counter()

        def shapes_only(module_of: Any, inputs: torch.Tensor) -> Any:
            def run(name: str, on_output: Any) -> bool:
                model = self.models[name]
                return model.extractor.stream(module_of(name), list(model.layers.values()),
                                              inputs, on_output)
            return run

        empty = shapes_only(lambda name: self.models[name].loaded.module, image[:0])
        meta = shapes_only(self._meta_module,
                           torch.empty(image.shape, dtype=image.dtype, device="meta"))
        for run_shapes, batch in ((empty, 0), (meta, 1)):
            try:
                layout = probe_layout(models, run_shapes, labels, convert, align, batch)
            except Exception:  # noqa: BLE001 - any failure without values: try the next way
                layout = None
            if layout is not None:
                return layout
        layout = probe_layout(models, run_model, labels, convert, align)
        self.timings["layout_forward"] += time.perf_counter() - start
        return layout

    def _meta_module(self, name: str) -> torch.nn.Module:
        """A copy of model ``name`` whose parameters and buffers are on the ``meta`` device
        (made once; the weights themselves are not copied)."""
        if name not in self.meta_modules:
            module = self.models[name].loaded.module
            memo: dict[int, Any] = {}
            for tensor in [*module.parameters(), *module.buffers()]:
                meta = torch.empty_like(tensor, device="meta")
                memo[id(tensor)] = (torch.nn.Parameter(meta, requires_grad=False)
                                    if isinstance(tensor, torch.nn.Parameter) else meta)
            self.meta_modules[name] = copy.deepcopy(module, memo)
        return self.meta_modules[name]

    def complete(self, launched: LaunchedImage) -> ImageResult:
        """Wait for a launched image's values and compute its tables' inputs."""
        threads = torch.get_num_threads()
        if launched.ended is not None:
            start = time.perf_counter()
            launched.ended.synchronize()
            seconds = time.perf_counter() - start
            self.timings["forward_and_moments"] += seconds
            self.timings["wait_for_device"] += seconds
            # from the image's first to its last queued work on the device, idle gaps included
            self.timings["device_span"] += launched.began.elapsed_time(launched.ended) / 1000
            # the host part is small matrices (maps x maps) beside the reader and writer
            # threads: a pool of many threads there costs more in waiting than it saves
            torch.set_num_threads(1)
        result = ImageResult(launched.image_id, groups=launched.groups)
        try:
            for group in launched.groups:
                self.values(launched.image_id, group, result)
            if launched.null:
                start = time.perf_counter()
                result.null.extend(null_similarities(launched.null, self.metrics, self.null))
                self.timings["null"] += time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)
        return result

    def _prepare(self, models: list[str], stack: MapStack, moments: Moments) -> PreparedValues:
        """Every map metric's values and dead-map flags for one group, computed where the
        moments are and copied to the host without waiting."""
        prepared = PreparedValues()
        for i, metric in enumerate(self.metrics):
            if metric.accumulates or metric.info.granularity != "map":
                continue
            dead = metric.dead(moments, self.engine.dead_std)
            prepared.dead[i] = _to_host(dead)
            for a, b in self.comparisons:
                if a not in models:
                    continue
                directions = [(a, b)] if a == b or metric.info.symmetric else [(a, b), (b, a)]
                for x, y in directions:
                    values, undefined = prepared_values(metric, stack, moments, x, y, dead,
                                                        self.engine.dead_maps)
                    prepared.directions[(i, x, y)] = DirectionValues(_to_host(values),
                                                                     _to_host(undefined))
        return prepared

    # ------------------------------------------------------------------ values
    def values(self, image_id: str, group: GroupMoments, result: ImageResult,
               metrics: list[Metric] | None = None, count_dead: bool = True) -> None:
        """Dead-map counts, layer values and map matrices of one group into ``result``."""
        start = time.perf_counter()
        if count_dead:
            result.frames.append(("dead_maps", self._count_dead(image_id, group, result)))
        prepared = group.prepared or PreparedValues()
        stack, moments = group.stack, group.moments
        aligned = self.aligned(stack)
        chosen = self.metrics if metrics is None else metrics
        for i, metric in enumerate(self.metrics):
            if metric.accumulates or metric not in chosen:
                continue
            for a, b in self.comparisons:
                if a not in group.models:
                    continue
                if metric.info.granularity == "layer":
                    values = layer_similarity(metric, stack, moments, a, b)
                    result.frames.append(("layer_similarity",
                                          layer_frame(image_id, values, aligned)))
                    continue
                directions = [(a, b)]
                if a != b and not metric.info.symmetric:
                    directions.append((b, a))
                for x, y in directions:
                    ahead = prepared.directions.get((i, x, y))
                    sim = map_similarity(
                        metric, stack, moments, x, y, dead_policy=self.engine.dead_maps,
                        dead_std=self.engine.dead_std, dead=prepared.dead.get(i),
                        values=None if ahead is None else ahead.values,
                        undefined=None if ahead is None else ahead.undefined)
                    sim.aligned = aligned
                    result.matrices.append(sim)
                if a != b and metric.info.symmetric:  # inter-network: keep both directions
                    result.matrices.append(result.matrices[-1].transposed())
        self.timings["similarity"] += time.perf_counter() - start

    def aligned(self, stack: MapStack) -> str | None:
        """The ``aligned`` column of a group's rows (None without ``engine.align``); the
        sizes seen are kept for run.json."""
        align = getattr(self.engine, "align", None)
        if align is None:
            return None
        size = stack.blocks[0].shape
        label = align_label(align, size)
        self.aligned_sizes.setdefault(tuple(dict.fromkeys(b.model for b in stack.blocks)),
                                      set()).add(tuple(size))
        return label

    def _count_dead(self, image_id: str, group: GroupMoments,
                    result: ImageResult) -> pd.DataFrame:
        rows = []
        for metric in self.metrics:
            dead = metric.dead(group.moments, self.engine.dead_std).cpu().numpy()
            for block in group.stack.blocks:
                n_dead = int(dead[block.start:block.stop].sum())
                key = DeadKey(metric.label, block.model, block.layer)
                result.dead_counts.setdefault(key, DeadCount()).add(DeadCount(n_dead, 1))
                rows.append({"image": image_id, "metric": metric.label, "model": block.model,
                             "layer": block.layer, "n_maps": block.n_maps, "n_dead": n_dead})
        frame = pd.DataFrame(rows)
        aligned = self.aligned(group.stack)
        if aligned is not None and not frame.empty:
            frame.insert(1, "aligned", aligned)
        return frame

    def pooled(self, pooled: Mapping[int, Moments], layouts: Mapping[int, MapStack]
               ) -> ImageResult:
        """Frames and matrices from the moments merged over all images (moment-based
        metrics only), with the image ``pooled``."""
        result = ImageResult(POOLED_IMAGE)
        metrics = [m for m in self.metrics if m.uses_moments]
        for index, models in enumerate(self.groups):
            moments = pooled.get(index)
            if moments is None:
                continue
            group = GroupMoments(index, models, layouts[index], moments, moments)
            self.values(POOLED_IMAGE, group, result, metrics=metrics, count_dead=False)
        return result

    def across_images(self) -> list[pd.DataFrame]:
        """Rows of the metrics computed across images, after the last image."""
        frames = []
        for metric in self.metrics:
            if not metric.accumulates:
                continue
            for a, b in self.comparisons:
                values = [layer_value(metric, a, la, b, lb, value)
                          for (la, lb), value in metric.finish(a, b).items()]
                frames.append(layer_frame(ACROSS_IMAGES, values))
        return frames

    def _out_of_memory(self, item: ImageItem) -> MapsimError:
        return MapsimError(
            f"out of GPU memory on image {item.id} ({self.device}): fewer layers or models "
            "per run, a smaller engine.chunk_pixels, or --device cpu will fit"
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
