"""Reading a results directory for plotting, and writing pictures atomically."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mapsim.errors import OutputError

POOLED_IMAGE = "pooled"
#: columns read as text whatever they hold (a layer label such as "1" stays "1")
KEY_COLUMNS = ("image", "metric", "model_a", "layer_a", "model_b", "layer_b", "model", "layer",
               "statistic")
PAIR_KEYS = ["metric", "model_a", "layer_a", "model_b", "layer_b"]
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(text: str) -> str:
    """A file-name-safe form of ``text``; a short hash keeps changed names distinct."""
    safe = _SAFE.sub("-", str(text)).strip("-.") or "x"
    if safe != text:
        safe += "-" + hashlib.sha1(str(text).encode()).hexdigest()[:6]
    return safe


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; pictures are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (fixed metadata, so equal figures give equal files)."""
    buffer = io.BytesIO()
    # one layout pass: the figures use the constrained layout, so no bbox_inches="tight"
    fig.savefig(buffer, format="png", dpi=fig.dpi, metadata={"Software": None})
    return buffer.getvalue()


def save_figure(fig: Any, path: Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically.

    Figures here are plain :class:`~matplotlib.figure.Figure` objects that pyplot never
    tracks, so there is nothing to close: the figure is freed with its last reference.
    """
    atomic_write_bytes(path, figure_png(fig))
    return path


@dataclass
class MetricView:
    """What a plot needs to know of a metric (from run.json)."""

    label: str
    name: str
    higher_is_more_similar: bool = True
    symmetric: bool = True
    granularity: str = "map"
    value_range: tuple[float, float] | None = None

    @property
    def best_word(self) -> str:
        """``max`` for a similarity, ``min`` for a distance (the best partner's value)."""
        return "max" if self.higher_is_more_similar else "min"

    def passes_word(self, threshold: float) -> str:
        """``>= 0.8`` or ``<= 0.8``."""
        return f"{'≥' if self.higher_is_more_similar else '≤'} {threshold:g}"

    def bounded_range(self) -> tuple[float, float] | None:
        """The metric's value range, when both ends are finite."""
        if self.value_range is None:
            return None
        low, high = (float(v) for v in self.value_range)
        return (low, high) if np.isfinite(low) and np.isfinite(high) else None


@dataclass
class Results:
    """A results directory opened for plotting. Tables are read on first use."""

    root: Path
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path) -> Results:
        """Open ``root``; it must hold a run.json (a results directory written by mapsim)."""
        root = Path(root)
        path = root / "run.json"
        if not path.is_file():
            raise OutputError(
                f"{root} is not a mapsim results directory (no run.json); give the folder a "
                "`mapsim run` wrote"
            )
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read {path}: {exc}") from exc
        return cls(root, info)

    def table(self, name: str) -> pd.DataFrame | None:
        """``<name>.csv`` (e.g. ``pooled/pivot``), or None when the run did not write it."""
        path = self.root / f"{name}.csv"
        if not path.is_file():
            return None
        try:
            return pd.read_csv(path, dtype={c: str for c in KEY_COLUMNS},
                               keep_default_na=True)
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read {path}: {exc}") from exc

    @cached_property
    def summary(self) -> pd.DataFrame | None:
        return self.table("summary")

    @cached_property
    def pivot(self) -> pd.DataFrame | None:
        return self.table("pivot")

    @cached_property
    def best(self) -> pd.DataFrame | None:
        return self.table("max")

    def by_pair(self, name: str) -> dict[tuple[str, ...], pd.DataFrame]:
        """Rows of a table grouped by (metric, model_a, layer_a, model_b, layer_b), cached."""
        cache = self.__dict__.setdefault("_by_pair", {})
        if name not in cache:
            frame = {"max": self.best, "pivot": self.pivot, "summary": self.summary,
                     "layer_similarity": self.layer_similarity}.get(name)
            if frame is None or frame.empty:
                cache[name] = {}
            else:
                cache[name] = {tuple(key): rows for key, rows in
                               frame.groupby(PAIR_KEYS, sort=False, dropna=False)}
        return cache[name]

    @cached_property
    def layer_similarity(self) -> pd.DataFrame | None:
        return self.table("layer_similarity")

    @cached_property
    def dead_maps(self) -> pd.DataFrame | None:
        return self.table("dead_maps")

    # ------------------------------------------------------------------ run.json views
    @property
    def name(self) -> str:
        return str(self.info.get("spec", {}).get("name", self.root.name))

    def layers(self, model: str) -> list[str]:
        """The layer labels of ``model`` in model order (run.json), else as they appear."""
        known = self.info.get("models", {}).get(model, {}).get("layers")
        if known:
            return list(known)
        seen: dict[str, None] = {}
        for frame in (self.pivot, self.layer_similarity):
            if frame is None:
                continue
            for side in ("a", "b"):
                rows = frame[frame[f"model_{side}"] == model]
                seen.update(dict.fromkeys(rows[f"layer_{side}"].astype(str)))
        return list(seen)

    def metrics(self) -> dict[str, MetricView]:
        """The run's metrics by label."""
        views = {}
        for m in self.info.get("metrics", []):
            label = m.get("label") or m.get("name")
            rng = m.get("value_range")
            views[label] = MetricView(
                label=label, name=m.get("name", label),
                higher_is_more_similar=bool(m.get("higher_is_more_similar", True)),
                symmetric=bool(m.get("symmetric", True)),
                granularity=m.get("granularity", "map"),
                value_range=tuple(rng) if rng else None,
            )
        return views

    def metric(self, label: str) -> MetricView:
        """One metric's view; an unknown label (e.g. from a newer plugin) gets defaults."""
        return self.metrics().get(label, MetricView(label=label, name=label))

    def comparisons(self) -> list[tuple[str, str]]:
        """Ordered (model_a, model_b) panels: each intra comparison, then both inter directions."""
        pairs = [tuple(p) for p in self.info.get("comparisons", [])]
        intra = [(a, b) for a, b in pairs if a == b]
        inter = [(a, b) for a, b in pairs if a != b]
        return intra + [d for a, b in inter for d in ((a, b), (b, a))]

    def images(self) -> list[str]:
        """Image ids in the order the run met them (pooled left out)."""
        for frame in (self.pivot, self.dead_maps, self.layer_similarity):
            if frame is not None and "image" in frame:
                ids = dict.fromkeys(frame["image"].astype(str))
                ids.pop(POOLED_IMAGE, None)
                return list(ids)
        return []

    # ------------------------------------------------------------------ saved arrays
    def thumbnails(self, image: str) -> dict[str, np.ndarray]:
        """Saved thumbnails of one image: ``{thumb_key: (C,h,w) float32, "__input__": ...}``."""
        return _load_arrays(self.root / "thumbnails", image)

    def matrices(self, image: str) -> dict[str, Any]:
        """Saved similarity matrices of one image (see :mod:`mapsim.plots.capture`)."""
        return _load_arrays(self.root / "matrices", image)

    def saved_images(self, kind: str = "thumbnails") -> list[str]:
        """Image ids with saved ``thumbnails`` or ``matrices``."""
        index = self.root / kind / "index.json"
        if not index.is_file():
            return []
        return list(json.loads(index.read_text(encoding="utf-8")))


def _load_arrays(folder: Path, image: str) -> dict[str, Any]:
    index = folder / "index.json"
    if not index.is_file():
        return {}
    files = json.loads(index.read_text(encoding="utf-8"))
    if image not in files:
        return {}
    path = folder / files[image]
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = json.loads(str(data["__keys__"]))
            meta = json.loads(str(data["__meta__"])) if "__meta__" in data else {}
            arrays = {key: data[f"a{i}"].astype(np.float32) for i, key in enumerate(keys)}
    except (OSError, ValueError, KeyError) as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc
    if meta:
        arrays["__meta__"] = meta
    return arrays
