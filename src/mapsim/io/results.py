"""Reading a results directory: its tables, run.json and saved arrays (no drawing here).

:class:`ResultsDir` is what the pictures (:mod:`mapsim.plots`) and the public
:class:`mapsim.Results` read a folder written by ``mapsim run`` through. It needs pandas and
numpy only: never matplotlib.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from mapsim.errors import OutputError

__all__ = [
    "KEY_COLUMNS",
    "PAIR_KEYS",
    "POOLED_IMAGE",
    "TABLES",
    "MetricView",
    "ResultsDir",
]

#: the ``image`` value of the pooled tables (moments merged over all images)
POOLED_IMAGE = "pooled"
#: columns read as text whatever they hold (a layer label such as "1" stays "1")
KEY_COLUMNS = ("image", "metric", "model_a", "layer_a", "model_b", "layer_b", "model", "layer",
               "statistic")
#: the columns that name one layer pair of one metric
PAIR_KEYS = ["metric", "model_a", "layer_a", "model_b", "layer_b"]
#: the tables a run may write at the top of its results directory, in the order listed
TABLES = ("max", "min", "pivot", "summary", "layer_similarity", "layer_similarity_summary",
          "dead_maps", "baselines", "map_pvalues")

_R = TypeVar("_R", bound="ResultsDir")


@dataclass
class MetricView:
    """What a reader needs to know of a metric (from run.json)."""

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


@dataclass(repr=False)
class ResultsDir:
    """A results directory opened for reading. Tables are read on first use and kept.

    A table the run did not write reads as an empty DataFrame (:meth:`has` tells the two
    apart); :meth:`table` gives None instead. Key columns (image, metric, model and layer
    names, statistic) are read as text, so a layer labelled ``1`` stays ``"1"``.
    """

    root: Path
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls: type[_R], root: str | Path) -> _R:
        """Open ``root``; it must hold a run.json (a results directory written by mapsim).

        Raises :class:`~mapsim.errors.OutputError` when it does not, or run.json cannot be read.
        """
        root = Path(root)
        path = root / "run.json"
        if not root.is_dir():
            raise OutputError(
                f"{root} is not a mapsim results directory (no such folder, so no run.json); "
                "give the folder a `mapsim run` wrote"
            )
        if not path.is_file():
            raise OutputError(
                f"{root} is not a mapsim results directory (no run.json); give the folder a "
                "`mapsim run` wrote"
            )
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read {path}: {exc}") from exc
        if not isinstance(info, dict):
            raise OutputError(f"{path} is not a mapsim run.json (not a JSON object)")
        return cls(root, info)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # ------------------------------------------------------------------ tables
    def has(self, name: str) -> bool:
        """Whether the run wrote ``<name>.csv`` (e.g. ``"max"``, ``"pooled/pivot"``)."""
        return (self.root / f"{name}.csv").is_file()

    def table(self, name: str) -> pd.DataFrame | None:
        """``<name>.csv`` (e.g. ``pooled/pivot``), or None when the run did not write it.

        Read once and kept: change a copy (``.copy()``), not the frame returned.
        """
        cache = self.__dict__.setdefault("_tables", {})
        if name not in cache:
            cache[name] = self._read(name)
        return cache[name]

    def frame(self, name: str) -> pd.DataFrame:
        """``<name>.csv``, or an empty DataFrame when the run did not write it."""
        table = self.table(name)
        return pd.DataFrame() if table is None else table

    def _read(self, name: str) -> pd.DataFrame | None:
        path = self.root / f"{name}.csv"
        if not path.is_file():
            return None
        try:
            return pd.read_csv(path, dtype={c: str for c in KEY_COLUMNS}, keep_default_na=True)
        except pd.errors.EmptyDataError:  # a zero-byte file: no columns, no rows
            return pd.DataFrame()
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read {path}: {exc}") from exc

    @property
    def max(self) -> pd.DataFrame:
        """max.csv: for each map of layer a (model a) and each layer b (model b), its best
        partner (``map_b``) and the value (the highest for a similarity, the lowest for a
        distance), per image. Columns ``image, metric, model_a, layer_a, map_a, model_b,
        layer_b, map_b, value, dead_a, dead_b`` and, with a threshold, ``threshold,
        well_correlated``. Empty when the run did not write it (no ``max`` aggregator)."""
        return self.frame("max")

    @property
    def min(self) -> pd.DataFrame:
        """min.csv: like :attr:`max`, the worst partner. Empty when the run did not write it."""
        return self.frame("min")

    @property
    def pivot(self) -> pd.DataFrame:
        """pivot.csv: per image and layer pair, n_maps, n_dead, n_live, ``best_*`` (mean,
        median, std of the live maps' best values) and ``n_well, pct_well, well_*`` (those
        passing the threshold). Empty when the run did not write it."""
        return self.frame("pivot")

    @property
    def summary(self) -> pd.DataFrame:
        """summary.csv: every pivot statistic across images, one row per layer pair and
        ``statistic`` with its ``mean``, ``std`` and ``n_images``. Empty when not written."""
        return self.frame("summary")

    @property
    def layer_similarity(self) -> pd.DataFrame:
        """layer_similarity.csv: layer-level metrics (e.g. CKA), one ``value`` per image and
        layer pair (empty with a ``reason`` where undefined). Empty when not written."""
        return self.frame("layer_similarity")

    @property
    def layer_similarity_summary(self) -> pd.DataFrame:
        """layer_similarity_summary.csv: the layer-level values across images. Empty when
        not written."""
        return self.frame("layer_similarity_summary")

    @property
    def dead_maps(self) -> pd.DataFrame:
        """dead_maps.csv: per image, metric, model and layer, ``n_maps`` and ``n_dead``
        (maps with no variance over the pixels compared). Empty when not written."""
        return self.frame("dead_maps")

    def by_pair(self, name: str) -> dict[tuple[str, ...], pd.DataFrame]:
        """Rows of a table grouped by (metric, model_a, layer_a, model_b, layer_b), cached."""
        cache = self.__dict__.setdefault("_by_pair", {})
        if name not in cache:
            frame = self.frame(name)
            if frame.empty or not set(PAIR_KEYS) <= set(frame.columns):
                cache[name] = {}
            else:
                cache[name] = {tuple(key): rows for key, rows in
                               frame.groupby(PAIR_KEYS, sort=False, dropna=False)}
        return cache[name]

    # ------------------------------------------------------------------ run.json views
    @property
    def name(self) -> str:
        """The run's name (the spec's ``name``; else the folder's)."""
        return str(self.info.get("spec", {}).get("name", self.root.name))

    def layers(self, model: str) -> list[str]:
        """The layer labels of ``model`` in model order (run.json), else as they appear."""
        known = self.info.get("models", {}).get(model, {}).get("layers")
        if known:
            return list(known)
        seen: dict[str, None] = {}
        for frame in (self.pivot, self.layer_similarity):
            if frame.empty:
                continue
            for side in ("a", "b"):
                rows = frame[frame[f"model_{side}"] == model]
                seen.update(dict.fromkeys(rows[f"layer_{side}"].astype(str)))
        return list(seen)

    @cached_property
    def _metric_views(self) -> dict[str, MetricView]:
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

    def metrics(self) -> dict[str, MetricView]:
        """The run's metrics by label (a new dict each call)."""
        return dict(self._metric_views)

    def metric(self, label: str) -> MetricView:
        """One metric's view; an unknown label (e.g. from a newer plugin) gets defaults."""
        return self._metric_views.get(label, MetricView(label=label, name=label))

    def comparisons(self) -> list[tuple[str, str]]:
        """Ordered (model_a, model_b) panels: each intra comparison, then both inter directions."""
        pairs = [tuple(p) for p in self.info.get("comparisons", [])]
        intra = [(a, b) for a, b in pairs if a == b]
        inter = [(a, b) for a, b in pairs if a != b]
        return intra + [d for a, b in inter for d in ((a, b), (b, a))]

    def images(self) -> list[str]:
        """Image ids in the order the run met them (pooled left out)."""
        for frame in (self.pivot, self.dead_maps, self.layer_similarity):
            if "image" in frame:
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
