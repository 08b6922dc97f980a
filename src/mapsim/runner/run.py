"""Run a validated spec: models -> images -> maps -> moments -> metrics -> tables -> files."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import mapsim
from mapsim.tables import aggregation
from mapsim.runner.blocks import (
    BlockState,
    ImageBlock,
    LocalBlocks,
    PartialRun,
    assign_blocks,
    plan_blocks,
)
from mapsim.runner.distributed import STOP_WAIT_S, Inbox, RemoteBlocks, World
from mapsim.errors import ExtractionError, ImageError, MapsimError, SpecError
from mapsim.models.layers import resolve_layers
from mapsim.io.images import roi_mask
from mapsim.models.build import LoadedModel, build_from_spec
from mapsim.engine.moments import Moments, compute_moments
from mapsim.runner.pipeline import make_sink, prefetch, to_device
from mapsim.api import Aggregator, Extractor, ImageItem, Metric
from mapsim.registry import Registry, load_registry
from mapsim.engine.streaming import Layout, can_stream, probe_layout, stream_group
from mapsim.runner.tablework import (
    AggregateJob,
    BlockMark,
    FrameJob,
    TableWork,
    WorkResult,
    aggregate_tables,
    with_image,
)
from mapsim.engine.similarity import (
    LayerValue,
    MapStack,
    SimilarityMatrix,
    comparison_groups,
    layer_similarity,
    layer_value,
    map_similarity,
    prepared_values,
    stack_maps,
)

POOLED_IMAGE = "pooled"
#: the image column of rows computed across all images (metrics with ``accumulates``)
ACROSS_IMAGES = "all-images"


@dataclass
class PreparedModel:
    """A loaded model with its extractor and the layers to capture (label -> path)."""

    loaded: LoadedModel
    extractor: Extractor
    layers: dict[str, str]
    #: as built (before any batch norm is folded)
    parameters: int = 0


@dataclass
class RunResult:
    """What a run produced."""

    out_dir: Path
    n_images: int
    tables: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an unavailable device is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise MapsimError(
            f"device {requested!r} was requested but CUDA is not available here; "
            "use --device cpu or device: auto"
        )
    if requested == "mps" and not torch.backends.mps.is_available():
        raise MapsimError("device 'mps' was requested but is not available; use device: auto")
    return torch.device(requested)


def layer_labels(spec_layers: Any, available: list[str], model: str) -> dict[str, str]:
    """``{label: module path}`` from a spec's layers entry (list, pattern or mapping)."""
    if isinstance(spec_layers, dict):
        labels = {}
        for label, path in spec_layers.items():
            if path not in available:
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
        return dict(sorted(labels.items(), key=lambda item: order[item[1]]))
    paths = resolve_layers(available, spec_layers, model)
    return {p: p for p in paths}


class Runner:
    """Executes one validated run spec. Use :func:`run` unless you need the pieces."""

    def __init__(self, spec: Any, base_dir: Path, device: str | None = None,
                 registry: Registry | None = None) -> None:
        self.spec = spec
        self.base_dir = Path(base_dir)
        self.registry = registry or load_registry()
        self.device = resolve_device(device or spec.device)
        self.comparisons = spec.pairs()
        self.groups = comparison_groups(self.comparisons)
        self.metrics: list[Metric] = [self._metric(m) for m in spec.metrics]
        self.aggregators: list[Aggregator] = self._aggregators(spec.aggregators)
        for aggregator in self.aggregators:
            aggregator.prepare(self.metrics)
        self.timings: dict[str, float] = defaultdict(float)
        self.dead_counts: dict[tuple[str, str, str], list[int]] = {}
        self.pooled: dict[int, Moments] = {}
        self.pooled_stacks: dict[int, MapStack] = {}
        self.models: dict[str, PreparedModel] = {}
        self.fused: dict[str, list[str]] = {}  # model -> modules whose batch norm was folded
        self.layouts: dict[tuple, Layout] = {}  # (group, image shape) -> layout, for streaming
        self.builders: dict[int, Any] = {}
        self._pending: tuple | None = None  # the fast-path image whose tables are not out yet
        self._block_ids: list[str] = []  # ids of the images of the block being done
        self.capture = None  # keeps thumbnails and matrices when plots are requested
        if spec.output.plots or spec.output.report:
            from mapsim.plots.capture import PlotCapture

            self.capture = PlotCapture(spec.output.plot_images)

    # ------------------------------------------------------------------ setup
    def _metric(self, choice: Any) -> Metric:
        params = choice.model_dump(exclude={"name", "label"})
        metric = self.registry.create("metric", choice.name, params)
        metric.label = choice.label or choice.name
        if (self.spec.engine.dead_maps == "original" and metric.dead_fill is None
                and metric.info.granularity == "map"):  # layer values have no dead-map rule
            raise SpecError(
                f"engine.dead_maps: 'original' is not defined for metric {choice.name!r}; "
                "use 'exclude'"
            )
        return metric

    def _aggregators(self, choices: list[Any]) -> list[Aggregator]:
        chosen = {c.name: c.model_dump(exclude={"name"}) for c in choices}
        pending = list(chosen)
        while pending:  # add what the chosen aggregators require, with default parameters
            name = pending.pop()
            for needed in self.registry.get("aggregator", name).cls.requires:
                if needed not in chosen:
                    chosen[needed] = {}
                    pending.append(needed)
        self.added_aggregators = sorted(set(chosen) - {c.name for c in choices})
        aggs = [self.registry.create("aggregator", n, p) for n, p in chosen.items()]
        return sorted(aggs, key=lambda a: (a.order, a.name))

    def check(self, base_dir: Path) -> Any:
        """Everything short of running: build models, resolve layers, find the images.

        Returns the dataset, so a run can go on with it.
        """
        self.prepare_models()
        return self.dataset(base_dir)

    def dataset(self, base_dir: Path) -> Any:
        """The spec's dataset (its images are found, not read)."""
        return self.registry.create(
            "dataset", self.spec.images.name, self.spec.images.model_dump(exclude={"name"}),
            base_dir=base_dir,
        )

    def prepare_models(self) -> None:
        """Build every compared model, move it to the device and resolve its layers."""
        used = dict.fromkeys(m for pair in self.comparisons for m in pair)
        for name in used:
            mspec = self.spec.models[name]
            loaded = build_from_spec(name, mspec, self.registry, self.base_dir)
            loaded.module.to(self.device).eval()
            extractor = self.registry.create(
                "extractor", mspec.extractor.name, mspec.extractor.model_dump(exclude={"name"})
            )
            available = extractor.layer_names(loaded.module)
            layers = layer_labels(self.spec.layers[name], available, name)
            parameters = sum(p.numel() for p in loaded.module.parameters())
            fuse = getattr(loaded.module, "fuse_for_inference", None)
            if fuse is not None and self.spec.engine.fuse_batchnorm:
                self.fused[name] = fuse(list(layers.values()))
            if self.device.type == "cuda":
                # cuDNN's tensor-core convolutions run on channels-last tensors without
                # transposes (same float32 values; maps are copied out of the hooks anyway)
                loaded.module.to(memory_format=torch.channels_last)
            self.models[name] = PreparedModel(loaded, extractor, layers, parameters)

    # ------------------------------------------------------------------ per image
    def extract(self, item: ImageItem) -> dict[str, dict[str, torch.Tensor]]:
        """Capture the chosen layers of every model for one image: {model: {label: (C,H,W)}}."""
        image = self._input(item)
        out = {}
        for name, model in self.models.items():
            captured = model.extractor.extract(model.loaded.module, list(model.layers.values()),
                                               image)
            maps = {}
            for label, path in model.layers.items():
                tensor = captured[path]
                if tensor.dim() != 4 or tensor.shape[0] != 1:
                    raise ExtractionError(
                        f"layer {path!r} of model {name!r} gives an output of shape "
                        f"{tuple(tensor.shape)}; mapsim compares maps of shape "
                        "(1, channels, height, width). Choose convolutional layers "
                        "(see `mapsim layers`)."
                    )
                maps[label] = tensor[0]
            out[name] = maps
        return out

    def _input(self, item: ImageItem) -> torch.Tensor:
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
        roi = self.spec.engine.roi
        if roi is None:
            return None
        if item.label is None:
            raise ImageError(
                f"engine.roi needs a label for image {item.id}, but the dataset gave none; "
                "add 'labels' to the images entry or remove engine.roi"
            )
        return torch.from_numpy(roi_mask(item.label, roi.dilate, source=item.source))

    def similarities(self, image_id: str, stack: MapStack, moments: Moments,
                     group_models: list[str], sink: Callable[[str, pd.DataFrame], None],
                     metrics: list[Metric] | None = None, ahead: dict | None = None) -> None:
        """Every metric (default: all of the spec's) and aggregator for one stacked group.

        ``ahead`` holds values computed beforehand by :meth:`_values_ahead`.
        """
        engine = self.spec.engine
        ahead = ahead or {}
        for metric in self.metrics if metrics is None else metrics:
            if metric.accumulates:  # served by update() and finish()
                continue
            dead = ahead.get((id(metric), "dead"))
            for a, b in self.comparisons:
                if a not in group_models:
                    continue
                if metric.info.granularity == "layer":
                    values = layer_similarity(metric, stack, moments, a, b)
                    sink("layer_similarity", _layer_frame(image_id, values))
                    continue
                values, undefined = ahead.get((id(metric), a, b), (None, None))
                sim = map_similarity(metric, stack, moments, a, b,
                                     dead_policy=engine.dead_maps, dead_std=engine.dead_std,
                                     values=values, dead=dead, undefined=undefined)
                directions = [sim]
                if a != b:  # inter-network: keep both directions
                    if metric.info.symmetric:
                        directions.append(sim.transposed())
                    else:
                        values, undefined = ahead.get((id(metric), b, a), (None, None))
                        directions.append(map_similarity(
                            metric, stack, moments, b, a, dead_policy=engine.dead_maps,
                            dead_std=engine.dead_std, values=values, dead=dead,
                            undefined=undefined))
                for direction in directions:
                    self._aggregate(image_id, direction, sink)

    def _aggregate(self, image_id: str, sim: Any, sink: Callable[[str, pd.DataFrame], None]) -> None:
        """The aggregators' tables of one matrix: handed to ``sink.aggregate`` when the sink
        has it (a run's sink builds them in its worker processes), else built here."""
        if self.capture is not None:
            self.capture.add_matrix(image_id, sim)
        if hasattr(sink, "aggregate"):
            sink.aggregate(image_id, sim)
            return
        start = time.perf_counter()
        tables = aggregate_tables(self.aggregators, sim, self.spec.output.pairs)
        self.timings["aggregate"] += time.perf_counter() - start
        for name, frame in tables.items():
            sink(name, with_image(frame, image_id))

    def _count_dead(self, image_id: str, stack: MapStack, moments: Moments) -> pd.DataFrame:
        rows = []
        for metric in self.metrics:
            dead = metric.dead(moments, self.spec.engine.dead_std).cpu().numpy()
            for block in stack.blocks:
                n_dead = int(dead[block.start:block.stop].sum())
                key = (metric.label, block.model, block.layer)
                total = self.dead_counts.setdefault(key, [0, 0])
                total[0] += n_dead
                total[1] += 1
                rows.append({"image": image_id, "metric": metric.label, "model": block.model,
                             "layer": block.layer, "n_maps": block.n_maps, "n_dead": n_dead})
        return pd.DataFrame(rows)

    def process(self, item: ImageItem, sink: Callable[[str, pd.DataFrame], None]) -> None:
        """Everything for one image (its tables are all emitted when this returns)."""
        self.submit(item, sink)
        self.flush(sink)

    def submit(self, item: ImageItem, sink: Callable[[str, pd.DataFrame], None],
               index: int | None = None, closes: ImageBlock | None = None) -> None:
        """Start one image. On the fast path its tables are emitted at the next :meth:`submit`
        or :meth:`flush`, so the device computes this image while the host finishes the last.

        ``index``: the image's place in the run (pictures keep the first images only).
        ``closes``: the block this image ends; after its tables, the block's state goes to
        ``sink.end_block`` (see :mod:`mapsim.runner.blocks`).
        """
        self._block_ids.append(item.id)
        try:
            self._process(item, sink, index, closes)
        except torch.cuda.OutOfMemoryError as exc:
            raise MapsimError(
                f"out of GPU memory on image {item.id} ({self.device}): fewer layers or models "
                "per run, a smaller engine.chunk_pixels, or --device cpu will fit"
            ) from exc

    def flush(self, sink: Callable[[str, pd.DataFrame], None]) -> None:
        """Emit the tables of the image still in flight, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._complete(pending, sink)

    def _process(self, item: ImageItem, sink: Callable[[str, pd.DataFrame], None],
                 index: int | None, closes: ImageBlock | None) -> None:
        pending = self._stream(item, closes)
        if pending is not None:
            previous, self._pending = self._pending, pending
            if previous is not None:
                self._complete(previous, sink)
            return
        self.flush(sink)  # keep the images' tables in order
        start = time.perf_counter()
        acts = self.extract(item)
        if self.capture is not None and (index is None or index < self.capture.n_images):
            self.capture.add_maps(item, acts)
        mask = self.mask_for(item)
        self._sync()
        self.timings["forward"] += time.perf_counter() - start
        for metric in self.metrics:
            if metric.accumulates:
                metric.update(item.id, acts, mask)
        norms = any(m.needs_layer_norms for m in self.metrics)
        for group, models in enumerate(self.groups):
            start = time.perf_counter()
            stack = stack_maps(acts, models, None if mask is None else mask.to(self.device))
            moments = compute_moments(
                stack.z, chunk_pixels=self.spec.engine.chunk_pixels,
                layers=[(b.start, b.stop) for b in stack.blocks] if norms else None)
            self._sync()
            self.timings["moments"] += time.perf_counter() - start
            if self.streamable:
                self.layouts[(group, item.image.shape)] = Layout.of(stack)
            self._emit(item.id, group, models, stack, moments, sink)
        del acts
        if closes is not None:
            self._close_block(self._take_block(closes, host=False), sink)

    def _emit(self, image_id: str, index: int, models: list[str], stack: MapStack,
              moments: Moments, sink: Callable[[str, pd.DataFrame], None],
              ahead: dict | None = None, pool: bool = True) -> None:
        """Dead-map counts, metrics and tables of one group, and (``pool``) the pooled
        moments."""
        start = time.perf_counter()
        nested = self.timings["aggregate"]
        sink("dead_maps", self._count_dead(image_id, stack, moments))
        self.similarities(image_id, stack, moments, models, sink, ahead=ahead)
        # similarity time without the aggregation done inside it (writing is in its thread)
        nested = self.timings["aggregate"] - nested
        self.timings["similarity"] += time.perf_counter() - start - nested
        if pool:
            self._pool(index, stack, moments)

    def _take_block(self, block: ImageBlock, host: bool) -> BlockState:
        """The runner's part of a block's state; the block's pooled moments and image ids
        start afresh. ``host``: copy the moments to the host without waiting (valid once the
        work queued so far is done), else copy them now."""
        state = BlockState(block, ids=self._block_ids,
                           pooled={g: m.to("cpu", non_blocking=host)
                                   for g, m in self.pooled.items()},
                           layouts={g: s.blocks for g, s in self.pooled_stacks.items()})
        self._block_ids, self.pooled = [], {}
        return state

    def _close_block(self, state: BlockState, sink: Any) -> None:
        """After the block's last tables: its dead-map counts and pictures, then the state to
        the sink."""
        state.dead_counts, self.dead_counts = self.dead_counts, {}
        if self.capture is not None:
            state.capture = self.capture.take()
        state.metrics = {i: m.block_state() for i, m in enumerate(self.metrics)
                         if m.accumulates and m.blockwise}
        sink.end_block(state)

    def _pool(self, index: int, stack: MapStack, moments: Moments) -> None:
        """Merge one image's moments into the pooled moments of its group."""
        if not self.spec.engine.pooled:
            return
        previous = self.pooled.get(index)
        self.pooled[index] = moments if previous is None else previous.merge(moments)
        if index not in self.pooled_stacks:  # blocks only; no pixel data kept
            self.pooled_stacks[index] = MapStack(stack.z[:, :0], stack.blocks)

    def _values_ahead(self, models: list[str], stack: MapStack, moments: Moments) -> dict:
        """Every map metric's values and dead-map flags for one group, computed where the
        moments are and copied to the host without waiting (on a GPU: queued behind the
        forward pass; valid once the image's event has completed). Keys: (id(metric),
        model a, model b) for (values, undefined) from :func:`prepared_values`, and
        (id(metric), "dead")."""
        ahead: dict = {}
        dead_std = self.spec.engine.dead_std
        for metric in self.metrics:
            if metric.accumulates or metric.info.granularity != "map":
                continue
            dead = metric.dead(moments, dead_std)
            ahead[(id(metric), "dead")] = _to_host(dead)
            for a, b in self.comparisons:
                if a not in models:
                    continue
                directions = [(a, b)] if a == b or metric.info.symmetric else [(a, b), (b, a)]
                for x, y in directions:
                    values, undefined = prepared_values(metric, stack, moments, x, y, dead,
                                                        self.spec.engine.dead_maps)
                    ahead[(id(metric), x, y)] = (_to_host(values), _to_host(undefined))
        return ahead

    @property
    def streamable(self) -> bool:
        """Whether images can take the fast path (see :mod:`mapsim.engine.streaming`); not when
        plots need the maps themselves."""
        return self.capture is None and can_stream(
            [m.extractor for m in self.models.values()], self.metrics)

    def _stream(self, item: ImageItem, closes: ImageBlock | None = None) -> tuple | None:
        """Launch the fast path for one image (moments built in the hooks); None: not possible.

        Returns what :meth:`_complete` needs: the moments are copied to the host without
        waiting, and an event marks when they are there.
        """
        if not self.streamable:
            return None
        start = time.perf_counter()
        began = None
        if self.device.type == "cuda":
            began = torch.cuda.Event(enable_timing=True)
            began.record()
        image = self._input(item)
        mask = self.mask_for(item)

        def run_model(name: str, on_output: Callable[[str, torch.Tensor], None]) -> bool:
            model = self.models[name]
            return model.extractor.stream(model.loaded.module, list(model.layers.values()),
                                          image, on_output)

        done = []
        for index, models in enumerate(self.groups):
            labels = {n: {p: lb for lb, p in self.models[n].layers.items()} for n in models}
            key = (index, item.image.shape)
            if key not in self.layouts:  # first image of this size: learn the layout
                layout = probe_layout(models, run_model, labels)
                if layout is None:
                    return None
                self.layouts[key] = layout
            out = stream_group(self.layouts[key], run_model, labels, self.device, mask,
                               self.spec.engine.chunk_pixels, self.builders.get(index))
            if out is None:
                return None
            stack, moments, self.builders[index] = out
            ahead = self._values_ahead(models, stack, moments)
            host = Moments(moments.n, _to_host(moments.mean), _to_host(moments.comoment))
            self._pool(index, stack, moments)  # on the device, queued like the rest
            done.append((index, models, MapStack(torch.empty(stack.z.shape[0], 0),
                                                 stack.blocks), host, ahead))
        closing = None if closes is None else self._take_block(closes, host=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        seconds = time.perf_counter() - start
        self.timings["forward_and_moments"] += seconds
        self.timings["launch"] += seconds
        return item.id, done, (began, event) if event is not None else None, closing

    def _complete(self, pending: tuple, sink: Callable[[str, pd.DataFrame], None]) -> None:
        image_id, done, event, closing = pending
        threads = torch.get_num_threads()
        if event is not None:
            began, event = event
            start = time.perf_counter()
            event.synchronize()
            seconds = time.perf_counter() - start
            self.timings["forward_and_moments"] += seconds
            self.timings["wait_for_device"] += seconds
            # from the image's first to its last queued work on the device, idle gaps included
            self.timings["device_span"] += began.elapsed_time(event) / 1000
            # the host part is small matrices (maps x maps) beside the reader and writer
            # threads: a pool of many threads there costs more in waiting than it saves
            torch.set_num_threads(1)
        try:
            for index, models, stack, moments, ahead in done:
                self._emit(image_id, index, models, stack, moments, sink, ahead, pool=False)
        finally:
            torch.set_num_threads(threads)
        if closing is not None:
            self._close_block(closing, sink)

    def pooled_tables(self, sink: Callable[[str, pd.DataFrame], None]) -> None:
        """Tables from the moments merged over all images (moment-based metrics only), named
        ``pooled/<table>``."""
        if hasattr(sink, "prefixed"):
            pooled = sink.prefixed("pooled/")
        else:
            def pooled(name: str, frame: pd.DataFrame) -> None:
                sink(f"pooled/{name}", frame)
        for index, models in enumerate(self.groups):
            moments = self.pooled.get(index)
            if moments is None:
                continue
            self.similarities(POOLED_IMAGE, self.pooled_stacks[index], moments, models, pooled,
                              metrics=[m for m in self.metrics if m.uses_moments])

    def across_image_tables(self, sink: Callable[[str, pd.DataFrame], None]) -> None:
        """Rows of the metrics that accumulate over images, after the last image."""
        for metric in self.metrics:
            if not metric.accumulates:
                continue
            for a, b in self.comparisons:
                values = [layer_value(metric, a, la, b, lb, result)
                          for (la, lb), result in metric.finish(a, b).items()]
                sink("layer_similarity", _layer_frame(ACROSS_IMAGES, values))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy that does not wait for the device (pinned memory; valid once the work
    queued before it is done)."""
    return tensor.to("cpu", non_blocking=True)


class RunSink:
    """Where a run's per-image tables go: into ``background`` (a sink of
    :mod:`mapsim.runner.pipeline` running :class:`~mapsim.runner.tablework.TableWork`), as finished
    frames or as matrices to aggregate there."""

    def __init__(self, background: Any, timings: dict[str, float], prefix: str = "",
                 states: dict[int, BlockState] | None = None) -> None:
        self.background = background
        self.timings = timings
        self.prefix = prefix
        #: block index -> the runner's part of its state, until the block's mark is delivered
        self.states = {} if states is None else states

    def __call__(self, name: str, frame: pd.DataFrame) -> None:
        self._put(FrameJob(self.prefix + name, frame))

    def aggregate(self, image_id: str, sim: SimilarityMatrix) -> None:
        """Queue one matrix for the aggregators."""
        self._put(AggregateJob(image_id, sim, self.prefix))

    def prefixed(self, prefix: str) -> RunSink:
        """The same sink, with ``prefix`` before every table name (e.g. ``pooled/``)."""
        return RunSink(self.background, self.timings, self.prefix + prefix, self.states)

    def end_block(self, state: BlockState) -> None:
        """Queue the end of a block, after every table of its images."""
        self.states[state.block.index] = state
        self._put(BlockMark(state.block.index))

    def _put(self, job: Any) -> None:
        start = time.perf_counter()
        self.background.put(job)
        self.timings["write"] += time.perf_counter() - start  # queueing; the work overlaps

    def close(self) -> None:
        """Wait until every table part is written; raise the first error, if any."""
        self.background.close()


def summary_accumulators(aggregators: list[Aggregator]) -> dict[str, Any]:
    """One across-image summary per table the aggregators summarise, and layer values."""
    summaries = {table: aggregation.SummaryAccumulator(keys)
                 for aggregator in aggregators for table, keys in aggregator.summarise.items()}
    summaries["layer_similarity"] = aggregation.SummaryAccumulator(
        ("metric", "model_a", "layer_a", "model_b", "layer_b"))
    return summaries


def table_sink(runner: Runner, output: Any, n_images: int) -> RunSink:
    """The sink of a rank's per-image tables: they are built and formatted in worker
    processes (or a thread) and go to ``output`` in the order they were queued (a
    :class:`~mapsim.runner.blocks.BlockOutput`, or anything with ``part``), where the tables
    summarised across images update the block's summaries in that order too."""
    summarised = summary_accumulators(runner.aggregators)
    work = TableWork(runner.aggregators, runner.spec.output.pairs,
                     {name: summary.keys for name, summary in summarised.items()})
    summaries = [summarised]  # the current block's
    states: dict[int, BlockState] = {}

    def deliver(result: WorkResult | BlockMark) -> None:
        if isinstance(result, BlockMark):
            state = states.pop(result.index)
            state.summaries, summaries[0] = summaries[0], summary_accumulators(runner.aggregators)
            output.commit(state)
            return
        for part in result.parts:
            output.part(part)
        for name, rows in result.summarised:
            summaries[0][name].add_rows(rows)
        runner.timings["aggregate_behind"] += result.seconds

    return RunSink(make_sink(work, deliver, n_images), runner.timings, states=states)


def _layer_frame(image_id: str, values: list[LayerValue]) -> pd.DataFrame:
    frame = pd.DataFrame([v.__dict__ for v in values])
    frame.insert(0, "image", image_id)
    return frame


def run(spec: Any, *, base_dir: str | Path = ".", out_dir: str | Path | None = None,
        device: str | None = None, overwrite: bool = False, resume: bool = False,
        progress: bool = True, registry: Registry | None = None) -> RunResult:
    """Run a validated spec and write its results directory.

    Relative paths inside the spec resolve against ``base_dir`` (the spec file's folder);
    ``out_dir`` defaults to the spec's ``output.dir``, else ``results/<name>``.

    The images are done in blocks of ``engine.block_images``, each kept in the partial
    directory beside the results until all are done. ``resume``: skip the blocks that an
    interrupted run of the same spec finished. Started by torchrun, every process runs this
    on its share of the blocks and rank 0 writes (see :mod:`mapsim.runner.distributed`); the
    results are the same as one process's.
    """
    started = time.perf_counter()
    base_dir = Path(base_dir)
    target = Path(out_dir) if out_dir is not None else (
        base_dir / spec.output.dir if spec.output.dir else Path("results") / spec.name
    )
    world = World.from_env()
    setup_error: BaseException | None = None
    values: dict[str, int] = {}
    runner = dataset = None
    try:
        chosen = world.device(resolve_device(device or spec.device))
        world.start(chosen)
    except BaseException:
        world.close()
        raise
    try:
        try:  # everything that can fail on one rank only, before the ranks meet
            runner = Runner(spec, base_dir, device=str(chosen), registry=registry)
            dataset = runner.dataset(base_dir)
            values = {"images": len(dataset), "spec": int(spec.digest()[:15], 16)}
        except Exception as exc:  # noqa: BLE001 - raised by agree(), on this rank
            setup_error = exc
        world.agree(setup_error, values)
        result = _run_blocks(spec, world, runner, dataset, target, overwrite, resume, progress,
                             started)
    except BaseException as exc:
        world.fail(exc)
        if world.stop_together():
            world.close()
        raise
    world.close()
    return result


def _run_blocks(spec: Any, world: World, runner: Runner, dataset: Any, target: Path,
                overwrite: bool, resume: bool, progress: bool, started: float) -> RunResult:
    """A run's blocks on this rank; on rank 0 also the merge and the results directory."""
    n_total = len(dataset)
    if n_total == 0:
        raise ImageError("the images entry gave no images")
    blocks = plan_blocks(n_total, spec.engine.block_images)
    partial = None
    if world.main:
        partial = PartialRun(target, spec.digest(), n_total, spec.engine.block_images,
                             resume=resume, overwrite=overwrite)
        done = set(partial.done)
        world.share("done", json.dumps(sorted(done)))
    else:
        done = set(json.loads(world.shared("done")))
    mine = assign_blocks(blocks, done, world.size, world.rank)
    output = LocalBlocks(mine, partial) if world.main else RemoteBlocks(mine, world)
    inbox = Inbox(world, partial) if world.main and world.distributed else None
    try:
        if done and any(m.accumulates and not m.blockwise for m in runner.metrics):
            raise SpecError(_cannot_share("resume an interrupted run", runner))
        if world.size > 1 and any(m.accumulates and not m.blockwise for m in runner.metrics):
            raise SpecError(_cannot_share(f"run in {world.size} processes", runner))
        for metric in runner.metrics:
            if metric.accumulates and metric.blockwise:
                metric.start_blocks()
        n_mine = sum(b.size for b in mine)
        # The worker processes that build the tables are forked before the models are built
        # and moved to a GPU: the workers hold no device state, and this process then shares
        # few pages with them, so it takes few copy-on-write faults (forking later slowed the
        # H100 main loop by ~25%).
        sink = table_sink(runner, output, n_mine)
        try:
            start = time.perf_counter()
            runner.prepare_models()
            runner.timings["setup"] = time.perf_counter() - started
            ids: set[str] = set()
            label = spec.name if not world.distributed else f"{spec.name} [{world.rank}]"
            bar = tqdm(total=n_mine, desc=label, unit="image",
                       disable=not progress or not world.main)
            for block, index, item in prefetch(block_items(dataset, mine), depth=2):
                world.check()
                if item.id in ids:
                    raise ImageError(
                        f"two images have the id {item.id!r}; image ids must be unique")
                ids.add(item.id)
                runner.submit(item, sink, index=index,
                              closes=block if index == block.stop - 1 else None)
                bar.update()
            bar.close()
            runner.flush(sink)
        except BaseException:
            # the image in flight may end a block (e.g. reading the next one failed): finish
            # it, so that the block is kept for --resume
            with contextlib.suppress(Exception):
                runner.flush(sink)
            raise
        finally:
            sink.close()
        output.finish()
        runner.timings["images"] = time.perf_counter() - start
        if not world.main:
            world.shared("finished")
            return RunResult(target.resolve(), n_total, [], {})
        if inbox is not None:
            inbox.wait()
        return _merge_and_publish(spec, world, runner, partial, blocks, done, overwrite,
                                  started)
    except BaseException as exc:
        world.fail(exc)  # before the abort: rank 0 then reports this error, not a lost link
        output.abort()
        if inbox is not None:  # the other ranks' blocks that are on their way
            inbox.join(STOP_WAIT_S)
        if partial is not None:
            note = partial.keep_or_remove()
            if note is not None and hasattr(exc, "add_note"):
                exc.add_note(note)
        raise


def _merge_and_publish(spec: Any, world: World, runner: Runner, partial: PartialRun,
                       blocks: list[ImageBlock], resumed: set[int], overwrite: bool,
                       started: float) -> RunResult:
    """Rank 0, after every block is done: the results directory, staged in the partial
    directory and moved into place."""
    from mapsim.runner.writer import ResultsWriter

    start = time.perf_counter()
    writer = ResultsWriter(partial.target, overwrite=overwrite, files=partial.rows)
    try:
        merged = partial.merge(blocks, runner.capture, runner.metrics)
        runner.dead_counts = merged.dead_counts
        runner.pooled = merged.pooled
        runner.pooled_stacks = {g: MapStack(torch.empty(layout[-1].stop, 0), layout)
                                for g, layout in merged.layouts.items()}
        if spec.engine.pooled:
            sink = table_sink(runner, WriterOutput(writer), 0)
            try:
                runner.pooled_tables(sink)
            finally:
                sink.close()
        runner.across_image_tables(writer.append)
        from_aggregators = {t for a in runner.aggregators for t in a.summarise}  # always written
        for table, accumulator in summary_accumulators(runner.aggregators).items():
            frame = merged.summaries.get(table, accumulator).table()
            if table in from_aggregators or not frame.empty:
                name = "summary" if table == "pivot" else f"{table}_summary"
                writer.write_table(name, frame)
        runner.timings["merge"] = time.perf_counter() - start
        info = run_info(spec, runner, merged.n_images, time.perf_counter() - started)
        info["blocks"] = {
            "processes": world.size, "backend": world.backend or "none",
            "block_images": spec.engine.block_images, "blocks": len(blocks),
            "resumed_blocks": len(resumed),
            "images_per_rank": {str(r): n for r, n in sorted(merged.images_per_rank.items())},
        }
        writer.write_json("run.json", info)
        if runner.capture is not None:
            from mapsim.plots import draw_for_run

            runner.capture.write(writer.staging)
            draw_for_run(writer.staging, report=spec.output.report)
        tables = writer.tables()
        out = writer.publish()
    except BaseException:
        writer.discard()
        raise
    partial.remove()
    world.share("finished", str(out))
    return RunResult(out, merged.n_images, tables, info)


class WriterOutput:
    """A results writer as a sink's output (tables that belong to no block)."""

    def __init__(self, writer: Any) -> None:
        self.part = writer.append_part


def block_items(dataset: Any, blocks: list[ImageBlock]) -> Iterator[tuple[ImageBlock, int, Any]]:
    """``(block, image index, image)`` for every image of ``blocks``, in order."""
    for block in blocks:
        count = 0
        for count, item in enumerate(dataset.slice(block.start, block.stop), start=1):
            yield block, block.start + count - 1, item
        if count != block.size:
            raise ImageError(
                f"the dataset has {len(dataset)} images but gave {count} for images "
                f"{block.start} to {block.stop - 1}; a dataset must give as many images as "
                "its length"
            )


def _cannot_share(what: str, runner: Runner) -> str:
    names = ", ".join(m.label for m in runner.metrics if m.accumulates and not m.blockwise)
    return (f"cannot {what}: metric {names} accumulates over all images in one process and "
            "cannot take them in blocks (its plugin has no blockwise support). Run it in one "
            "process without --resume, or leave it out")


def run_info(spec: Any, runner: Runner, n_images: int, seconds: float) -> dict[str, Any]:
    """The contents of run.json."""
    providers = runner.registry.providers()
    used = {
        "metrics": {m.name: providers["metric"][m.name] for m in runner.metrics},
        "aggregators": {a.name: providers["aggregator"][a.name] for a in runner.aggregators},
        "datasets": {spec.images.name: providers["dataset"][spec.images.name]},
        "extractors": {
            m.extractor.name: providers["extractor"][m.extractor.name]
            for m in runner.models.values()
        },
        "architectures": {
            s.architecture.name: providers["architecture"][s.architecture.name]
            for n, s in spec.models.items() if s.architecture is not None and n in runner.models
        },
    }
    return {
        "mapsim_version": mapsim.__version__,
        "spec": spec.model_dump(mode="json"),
        "spec_sha256": spec.digest(),
        "n_images": n_images,
        "comparisons": [list(p) for p in runner.comparisons],
        "models": {
            name: {"source": m.loaded.source, "layers": m.layers,
                   "parameters": m.parameters,
                   "batchnorm_folded": runner.fused.get(name, [])}
            for name, m in runner.models.items()
        },
        "metrics": [m.describe() | {"label": m.label} for m in runner.metrics],
        "aggregators": [
            {"name": a.name, "params": a.params.model_dump(mode="json"),
             "added_as_requirement": a.name in runner.added_aggregators}
            for a in runner.aggregators
        ],
        "plugins_used": used,
        "plugins_registered": providers,
        "device": str(runner.device),
        "precision": {
            "activations": "float32",
            "products": "float32 chunks over pixels, TF32 disabled",
            "accumulation": "float64",
            "merge_across_images": "float64, Chan et al. update",
        },
        "pooled": {
            "enabled": spec.engine.pooled,
            "metrics": [m.label for m in runner.metrics if m.uses_moments],
            "left_out": [m.label for m in runner.metrics if not m.uses_moments],
            "note": "pooled tables are computed from moments merged over all images; metrics "
                    "without a moments path are left out",
        },
        "dead_maps": {
            "policy": spec.engine.dead_maps,
            "dead_std": spec.engine.dead_std,
            "counts": [
                {"metric": k[0], "model": k[1], "layer": k[2], "dead_total": v[0], "images": v[1]}
                for k, v in runner.dead_counts.items()
            ],
        },
        "timings_s": {**{k: round(v, 4) for k, v in runner.timings.items()},
                      "total": round(seconds, 4)},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "pandas": pd.__version__,
        },
    }
