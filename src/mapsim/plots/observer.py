"""The pictures as a run observer: keep thumbnails and matrices during a run, draw after it.

The CLI and :func:`mapsim.run` attach a :class:`PlotObserver` when a spec asks for plots or a
report; the runner itself never imports this package.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mapsim.api import ImageItem
from mapsim.observers import RunObserver
from mapsim.plots.capture import PlotCapture
from mapsim.plots.draw import draw_for_run
from mapsim.plots.io import atomic_write_bytes
from mapsim.types import SimilarityMatrix


class PlotObserver(RunObserver):
    """Keeps what the pictures need (:class:`~mapsim.plots.capture.PlotCapture`: thumbnails
    of the first ``n_images`` images and their similarity matrices), writes it into the
    results before they are published, and draws ``plots/`` (and ``report.html`` when
    ``report``) in the published directory."""

    key: ClassVar[str] = "plots"
    needs_maps: ClassVar[bool] = True

    def __init__(self, report: bool = False, n_images: int = 1, progress: bool = False,
                 pictures: Sequence[str] | None = None) -> None:
        self.report = report
        #: the kinds of pictures to draw (None: the spec's output.pictures in run.json)
        self.pictures = None if pictures is None else list(pictures)
        self.progress = progress
        self.capture = PlotCapture(n_images)
        #: the pictures drawn by :meth:`finished`
        self.drawn: list[Path] = []

    def wants_maps(self, index: int) -> bool:
        """Only the first ``n_images`` images' maps are kept: the others stream."""
        return index < self.capture.n_images

    def on_maps(self, index: int, item: ImageItem,
                maps: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        if self.wants_maps(index):
            self.capture.add_maps(item, maps)

    def on_matrix(self, image_id: str, sim: SimilarityMatrix) -> None:
        self.capture.add_matrix(image_id, sim)

    def block_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return self.capture.take()

    def add_block_state(self, meta: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.capture.absorb(meta, dict(arrays))

    def write(self, staging: Path) -> None:
        self.capture.write(staging)

    def finished(self, out_dir: Path) -> None:
        """Draw the pictures, then record how long that took in run.json
        (``timings_s.draw``, seconds; ``timings_s.total`` stays the analysis alone)."""
        start = time.perf_counter()
        self.drawn = draw_for_run(out_dir, report=self.report, progress=self.progress,
                                  pictures=self.pictures)
        record_draw_time(Path(out_dir), time.perf_counter() - start)


def record_draw_time(out_dir: Path, seconds: float) -> None:
    """Add ``timings_s.draw`` to ``out_dir/run.json``, atomically (nothing else changes)."""
    path = out_dir / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no readable run.json: nothing to record into
        return
    info.setdefault("timings_s", {})["draw"] = round(seconds, 4)
    atomic_write_bytes(path, (json.dumps(info, indent=2, default=str) + "\n").encode("utf-8"))


def observers_for(output: Any, plots: bool | None = None,
                  progress: bool = False) -> list[RunObserver]:
    """The observers a spec's ``output`` asks for: a :class:`PlotObserver` when it wants
    plots or a report (``plots``: True or False overrides the spec; ``progress``: a
    progress bar while drawing)."""
    wanted = (output.plots or output.report) if plots is None else plots
    if not wanted:
        return []
    return [PlotObserver(report=bool(output.report), n_images=output.plot_images,
                         progress=progress, pictures=getattr(output, "pictures", None))]
