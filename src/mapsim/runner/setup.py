"""What a run is made of, before its first image: metrics, aggregators, models, dataset."""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from mapsim.api import Aggregator, Metric
from mapsim.devices import resolve_device
from mapsim.engine.precision import PendingProbe, check_precision
from mapsim.engine.null import NullSettings
from mapsim.engine.step import ImageStep
from mapsim.errors import MapsimWarning, SpecError, first_line
from mapsim.models.prepare import PreparedModel, prepare_model
from mapsim.models.start import SharedStart, initial_fingerprints, shared_starts
from mapsim.registry import Registry, load_registry


class RunSetup:
    """A validated spec's plugins, built: the metrics and aggregators at once (so a bad
    combination fails before any model is built), the models by :meth:`prepare_models`.

    Everything later stages read about the run (run.json, the merge) comes from here;
    nothing writes back into it after :meth:`prepare_models`.
    """

    def __init__(self, spec: Any, base_dir: Path, device: str | None = None,
                 registry: Registry | None = None) -> None:
        self.spec = spec
        self.base_dir = Path(base_dir)
        self.registry = registry or load_registry()
        self.device: torch.device = resolve_device(device or spec.device)
        check_precision(spec.engine.precision, self.device)
        self.comparisons: list[tuple[str, str]] = spec.pairs()
        self.metrics: list[Metric] = [self._metric(m) for m in spec.metrics]
        self.added_aggregators: list[str] = []
        self.aggregators: list[Aggregator] = self._aggregators(spec.aggregators)
        for aggregator in self.aggregators:
            aggregator.prepare(self.metrics)
        self.models: dict[str, PreparedModel] = {}
        #: what the forward pass's precision costs (:meth:`launch_precision_probe`, after the
        #: images)
        self.precision_probe: dict[str, Any] = {"skipped": "engine.precision_probe is off"}
        self._probe: PendingProbe | None = None
        #: comparisons whose models share starting weights (after :meth:`prepare_models`)
        self.shared_start: list[SharedStart] = []
        self.timings: dict[str, float] = defaultdict(float)
        self.step = ImageStep({}, self.metrics, self.comparisons, spec.engine, self.device,
                              self.timings)
        if spec.statistics.spatial_null and any(m.info.granularity == "map" and not m.accumulates
                                        for m in self.metrics):
            engine = spec.engine
            self.step.null = NullSettings(spec.statistics.seed, engine.dead_maps,
                                          engine.dead_std, engine.chunk_pixels, engine.align)

    def prepare_models(self) -> None:
        """Build every compared model, move it to the device and resolve its layers."""
        used = dict.fromkeys(m for pair in self.comparisons for m in pair)
        for name in used:
            self.models[name] = prepare_model(name, self.spec, self.registry, self.base_dir,
                                              self.device)
        self.step.models = dict(self.models)
        self.shared_start = self._shared_starts()
        for finding in self.shared_start:
            warnings.warn(finding.message(), MapsimWarning, stacklevel=2)

    def launch_precision_probe(self, dataset: Any) -> None:
        """Queue the measurement of what the precision policy costs on the dataset's first
        image (after the image loop: on a GPU the device computes it while the host merges
        and publishes; :meth:`finish_precision_probe` reads it). A probe that fails (e.g.
        runs out of memory) is recorded in run.json, with a warning, and the run's tables
        are kept."""
        start = time.perf_counter()
        first = next(iter(dataset.slice(0, 1)), None)
        if first is not None:
            self.step.release_buffers()
            try:
                self._probe = self.step.probe_precision(first)
            except Exception as exc:  # noqa: BLE001 - the images are done: keep the run
                self._probe = PendingProbe(first.id, note=_probe_failure(first.id, exc))
        self.timings["precision_probe"] += time.perf_counter() - start

    def finish_precision_probe(self) -> None:
        """Wait for the probe :meth:`launch_precision_probe` queued and keep its record."""
        if self._probe is None:
            return
        start = time.perf_counter()
        try:
            self.precision_probe = self._probe.read()
        except Exception as exc:  # noqa: BLE001 - the images are done: keep the run
            image = self._probe.image
            self.precision_probe = {"image": image, **_probe_failure(image, exc)}
        self._probe = None
        self.timings["precision_probe"] += time.perf_counter() - start

    def _shared_starts(self) -> list[SharedStart]:
        """Comparisons of two models with layers that started from (or are) the same
        weights; the starts are rebuilt only for models compared with another model."""
        others = {m for a, b in self.comparisons if a != b for m in (a, b)}
        rebuilt: dict[str, dict[str, str]] = {}
        at_start: dict[str, dict[str, str] | None] = {}
        for name in others:
            model = self.models[name]
            if model.start is None:
                at_start[name] = None
                continue
            paths = list(model.layers.values())
            known = rebuilt.get(model.start.key)
            if known is None or not set(paths) <= set(known):
                known = initial_fingerprints(model.start, self.registry, paths)
                rebuilt[model.start.key] = known
            at_start[name] = known
        return shared_starts(self.comparisons, {n: m.layers for n, m in self.models.items()},
                             {n: m.fingerprints for n, m in self.models.items()}, at_start)

    def _metric(self, choice: Any) -> Metric:
        params = choice.model_dump(exclude={"name", "label"}, exclude_unset=True)
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
        """Everything short of running: build models, resolve layers, find the images, read
        the first image and its label.

        Returns the dataset, so a run can go on with it.
        """
        self.prepare_models()
        dataset = self.dataset(base_dir)
        self.check_first_image(dataset)
        return dataset

    def check_first_image(self, dataset: Any) -> None:
        """Read the first image (and its label) and check it as a run's first step would:
        its channels against every model, its label where ``engine.roi`` needs one. The
        network is not run."""
        if len(dataset) == 0:
            return
        item = next(iter(dataset))
        self.step.input(item)
        self.step.mask_for(item)

    def dataset(self, base_dir: Path) -> Any:
        """The spec's dataset (its images are found, not read)."""
        return self.registry.create(
            "dataset", self.spec.images.name, self.spec.images.model_dump(exclude={"name"}),
            base_dir=base_dir,
        )


def _probe_failure(image: str | None, exc: Exception) -> dict[str, str]:
    """What run.json records of a precision probe that failed, with a warning."""
    reason = f"{type(exc).__name__}: {first_line(exc)}"
    memory = isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))
    warnings.warn(
        f"the precision probe {'ran out of memory' if memory else 'failed'} on image {image} "
        f"({reason}); the run's tables are complete, but run.json has no |delta r| for "
        "engine.precision. Rerun with engine.precision: exact to compare, or set "
        "engine.precision_probe: false.", MapsimWarning, stacklevel=3)
    return {"failed": reason}
