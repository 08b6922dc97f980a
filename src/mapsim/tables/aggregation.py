"""The study's tables from a similarity matrix: best/worst partners, threshold, pivot, summary.

Semantics (DESIGN.md section 5):

* best partner of map i of layer a in layer b: the highest value (lowest for distances) over
  the live maps of b; within one model and the same layer, i is never its own partner;
* a map is *well correlated* with layer b when its best value passes the threshold
  (>= for similarities, <= for distances);
* the pivot per (model a, layer a, model b, layer b) counts, and summarises the best values of
  the live maps and of those that pass the threshold; percentages are of all n_maps of layer a
  (the study's count / 64 x 100); std is the sample std (ddof=1, as pandas computes it) and is
  empty when fewer than two values exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mapsim.types import SimilarityMatrix

PARTNER_COLUMNS = [
    "metric", "model_a", "layer_a", "map_a", "model_b", "layer_b", "map_b", "value",
    "dead_a", "dead_b",
]
PIVOT_KEYS = ("metric", "model_a", "layer_a", "model_b", "layer_b")


def partners(sim: SimilarityMatrix, best: bool = True) -> pd.DataFrame:
    """For each map of A and each layer of B: its best (or worst) partner and the value.

    A map with no eligible partner (it is dead, or every map of b is) gets an empty partner
    and value; its ``dead_a`` flag says why. Rows are ordered by layer of A, layer of B, map
    of A. Vectorised: one argmax over all layers of B at once when they are equal-sized and
    contiguous, else one pass per layer of B.
    """
    prefer_high = sim.higher_is_more_similar == best
    filler = -np.inf if prefer_high else np.inf
    values = sim.values
    if sim.same_model:  # a map is never its own partner
        values = values.copy()
        for ba in sim.blocks_a:
            for bb in sim.blocks_b:
                if ba.layer == bb.layer:
                    k = np.arange(min(ba.n_maps, bb.n_maps))
                    values[ba.start + k, bb.start + k] = np.nan
    valid = ~np.isnan(values)
    scored = np.where(valid, values, filler)
    pick = np.argmax if prefer_high else np.argmin
    n_a, n_b = values.shape[0], len(sim.blocks_b)
    sizes = {bb.n_maps for bb in sim.blocks_b}
    contiguous = all(bb.start == k * bb.n_maps and bb.stop == (k + 1) * bb.n_maps
                     for k, bb in enumerate(sim.blocks_b))
    if len(sizes) == 1 and contiguous and values.shape[1] == n_b * sizes.pop():
        shape = (n_a, n_b, -1)
        idx = pick(scored.reshape(shape), axis=2)  # (n_a, nb)
        has = valid.reshape(shape).any(axis=2)
        value = np.take_along_axis(values.reshape(shape), idx[:, :, None], axis=2)[:, :, 0]
        starts = np.array([bb.start for bb in sim.blocks_b])
        dead_of_partner = sim.dead_b[starts[None, :] + idx]
        partner_b, value_b, has_b, dead_b_all = idx.T, value.T, has.T, dead_of_partner.T
    else:
        rows = np.arange(n_a)
        partner, value, has, dead_p = [], [], [], []
        for bb in sim.blocks_b:
            idx = pick(scored[:, bb.start:bb.stop], axis=1)
            partner.append(idx)
            value.append(values[rows, bb.start + idx])
            has.append(valid[:, bb.start:bb.stop].any(axis=1))
            dead_p.append(sim.dead_b[bb.start:bb.stop][idx])
        partner_b, value_b, has_b, dead_b_all = (np.array(partner), np.array(value),
                                                  np.array(has), np.array(dead_p))
    value_b = np.where(has_b, value_b, np.nan)  # (nb, n_a)

    def order(values: np.ndarray) -> np.ndarray:  # (nb, n_a) -> layer a, layer b, map a
        return np.concatenate([values[:, ba.start:ba.stop].reshape(-1) for ba in sim.blocks_a])

    has_all = order(has_b)
    map_b = pd.array(np.where(has_all, order(partner_b), 0), dtype="Int64")
    dead_b = pd.array(np.where(has_all, order(dead_b_all), False), dtype="boolean")
    if not has_all.all():
        map_b[~has_all] = pd.NA
        dead_b[~has_all] = pd.NA
    n_rows = len(has_all)
    return pd.DataFrame({
        "metric": constant_column(sim.metric, n_rows),
        "model_a": constant_column(sim.model_a, n_rows),
        "layer_a": pd.Categorical.from_codes(
            np.repeat(np.arange(len(sim.blocks_a)), [ba.n_maps * n_b for ba in sim.blocks_a]),
            categories=[ba.layer for ba in sim.blocks_a]),
        "map_a": np.concatenate([np.tile(np.arange(ba.n_maps), n_b) for ba in sim.blocks_a]),
        "model_b": constant_column(sim.model_b, n_rows),
        "layer_b": pd.Categorical.from_codes(
            np.concatenate([np.repeat(np.arange(n_b), ba.n_maps) for ba in sim.blocks_a]),
            categories=[bb.layer for bb in sim.blocks_b]),
        "map_b": map_b,
        "value": order(value_b),
        "dead_a": np.concatenate([np.tile(sim.dead_a[ba.start:ba.stop], n_b)
                                  for ba in sim.blocks_a]),
        "dead_b": dead_b,
    })


def constant_column(value: str, n_rows: int) -> pd.Categorical:
    """``n_rows`` copies of one string, as a categorical column.

    Names repeat on every row of the large tables; as categories they are stored once, which
    makes the tables cheap to build, to group and to hand to the writer processes (pickling
    a column of strings is slow, notably when pandas keeps strings in pyarrow arrays).
    """
    return pd.Categorical.from_codes(np.zeros(n_rows, dtype=np.int8), categories=[value])


def passes(values: pd.Series, threshold: float, higher_is_more_similar: bool) -> pd.Series:
    """Whether each best value passes ``threshold`` (NaN never passes)."""
    ok = values >= threshold if higher_is_more_similar else values <= threshold
    return ok.fillna(False).astype(bool)


def group_codes(frame: pd.DataFrame, keys: Sequence[str]) -> np.ndarray:
    """Group numbers of the rows by ``keys``, in order of first appearance (as pandas'
    ``groupby(keys, sort=False).ngroup()``), from one factorisation per column."""
    codes = np.zeros(len(frame), dtype=np.int64)
    for key in keys:
        series = frame[key]
        if isinstance(series.dtype, pd.CategoricalDtype):  # codes as they are (-1: missing)
            column, size = series.cat.codes.to_numpy() + 1, len(series.cat.categories) + 1
        else:
            values = series.to_numpy()
            if len(values) and (values == values[0]).all():  # e.g. one metric: no split
                continue
            column, uniques = pd.factorize(values, sort=False, use_na_sentinel=False)
            size = len(uniques)
        codes = codes * size + column
    return pd.factorize(codes, sort=False)[0]


def pivot(best: pd.DataFrame, threshold: float, higher_is_more_similar: bool) -> pd.DataFrame:
    """The study's Table 3 from a best-partner table (one row per layer pair).

    Vectorised: groups are numbered once and every statistic is a grouped reduction.
    """
    columns = [*PIVOT_KEYS, "threshold", "n_maps", "n_dead", "n_live", "best_mean",
               "best_median", "best_std", "n_well", "pct_well", "well_mean", "well_median",
               "well_std"]
    if best.empty:
        return pd.DataFrame(columns=columns)
    codes = group_codes(best, PIVOT_KEYS)
    n_groups = int(codes.max()) + 1
    values = best["value"].to_numpy(dtype=float)
    live = ~np.isnan(values)
    well = live & passes(best["value"], threshold, higher_is_more_similar).to_numpy()
    n_maps = np.bincount(codes, minlength=n_groups)
    first = np.unique(codes, return_index=True)[1]  # codes count up from 0 in row order
    out = {key: best[key].to_numpy()[first] for key in PIVOT_KEYS}
    out["threshold"] = np.full(n_groups, threshold, dtype=float)
    out["n_maps"] = n_maps
    out["n_dead"] = np.bincount(codes, weights=best["dead_a"].to_numpy(dtype=float),
                                minlength=n_groups).astype(int)
    out["n_live"] = np.bincount(codes, weights=live, minlength=n_groups).astype(int)
    n_well = np.bincount(codes, weights=well, minlength=n_groups).astype(int)
    for prefix, keep in (("best", live), ("well", well)):
        grouped = pd.Series(np.where(keep, values, np.nan)).groupby(codes, sort=True)
        if prefix == "well":
            out["n_well"] = n_well
            out["pct_well"] = 100.0 * n_well / n_maps
        out[f"{prefix}_mean"] = grouped.mean().to_numpy()
        out[f"{prefix}_median"] = grouped.median().to_numpy()
        out[f"{prefix}_std"] = grouped.std(ddof=1).to_numpy()
    frame = pd.DataFrame(out, columns=columns)
    for key in PIVOT_KEYS:  # keep the key columns' types (e.g. categories) as they were
        if frame[key].dtype != best[key].dtype:
            frame[key] = frame[key].astype(best[key].dtype)
    return frame


@dataclass
class SummaryRows:
    """What a table adds to a :class:`SummaryAccumulator`: the key of each row, the names of
    the statistics and their values (rows x statistics, float64). Cheap to pickle, so it can
    be extracted where the table was built and added elsewhere."""

    keys: list[tuple]
    stats: list[str]
    values: np.ndarray


def summary_rows(table: pd.DataFrame, keys: Sequence[str],
                 skip: Iterable[str] = ()) -> SummaryRows | None:
    """The keys and numeric (not boolean) statistics of ``table`` for a summary over ``keys``;
    None when there is nothing to add."""
    skip = set(skip) | set(keys)
    stats = [c for c, dtype in table.dtypes.items()
             if c not in skip and pd.api.types.is_numeric_dtype(dtype)
             and not pd.api.types.is_bool_dtype(dtype)]
    if not stats or table.empty:
        return None
    if keys:
        rows = list(zip(*(table[k].tolist() for k in keys)))
    else:
        rows = [()] * len(table)
    return SummaryRows(rows, stats, table[stats].to_numpy(dtype=float, na_value=np.nan))


class SummaryAccumulator:
    """Mean and sample std of numeric columns across images, streamed (Welford, float64).

    Memory is O(rows of one image's table), whatever the number of images. A value that is
    undefined for an image (NaN) is skipped; ``n_images`` counts the images that had one.
    Vectorised: one Welford step per table over a (keys x statistics) array.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self._rows: dict[tuple, int] = {}  # key -> row of the state arrays
        self._stats: dict[str, int] = {}  # statistic -> column
        self._n = np.zeros((0, 0), dtype=np.int64)
        self._mean = np.zeros((0, 0))
        self._m2 = np.zeros((0, 0))
        self._seen = np.zeros((0, 0), dtype=bool)
        self._order: list[tuple[int, int]] = []  # (row, column) in order of first appearance

    def add(self, table: pd.DataFrame, skip: Iterable[str] = ()) -> None:
        """Add one image's table (one row per key)."""
        self.add_rows(summary_rows(table, self.keys, skip))

    def add_rows(self, rows: SummaryRows | None) -> None:
        """Add one image's table, as :func:`summary_rows` extracted it (None: nothing)."""
        if rows is None:
            return
        known, row = self._rows, self._row
        index = np.array([known[k] if k in known else row(k) for k in rows.keys],
                         dtype=np.int64)
        cols = np.array([self._column(stat) for stat in rows.stats], dtype=np.int64)
        self._grow()
        values = rows.values
        if len(np.unique(index)) != len(index):  # a key twice in one table: one at a time
            for k in range(len(index)):
                self._update(index[k:k + 1], cols, values[k:k + 1])
        else:
            self._update(index, cols, values)

    def _row(self, key: tuple) -> int:
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = len(self._rows)
        return row

    def _column(self, stat: str) -> int:
        column = self._stats.get(stat)
        if column is None:
            column = self._stats[stat] = len(self._stats)
        return column

    def _grow(self) -> None:
        shape = (len(self._rows), len(self._stats))
        if self._n.shape[0] >= shape[0] and self._n.shape[1] >= shape[1]:
            return
        size = (max(shape[0], 2 * self._n.shape[0]), shape[1])
        for name in ("_n", "_mean", "_m2", "_seen"):
            old = getattr(self, name)
            new = np.zeros(size, dtype=old.dtype)
            new[: old.shape[0], : old.shape[1]] = old
            setattr(self, name, new)

    def _update(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        index = np.ix_(rows, cols)
        new = ~self._seen[index]
        if new.any():
            r, c = np.nonzero(new)  # row-major: the order the slots first appear in
            self._order.extend(zip(rows[r].tolist(), cols[c].tolist()))
            self._seen[index] = True
        ok = ~np.isnan(values)
        n = self._n[index] + ok
        mean, m2 = self._mean[index], self._m2[index]
        safe = np.where(ok, values, 0.0)
        delta = safe - mean
        new_mean = np.where(ok, mean + delta / np.maximum(n, 1), mean)
        self._m2[index] = np.where(ok, m2 + delta * (safe - new_mean), m2)
        self._n[index], self._mean[index] = n, new_mean

    def merge(self, other: SummaryAccumulator) -> None:
        """Add the images ``other`` has seen, as if they came after this one's (Chan et al.'s
        parallel update of count, mean and sum of squared deviations, float64). Keys and
        statistics keep their order of first appearance."""
        if other.keys != self.keys:
            raise ValueError(f"cannot merge summaries over {other.keys} into {self.keys}")
        if not other._order:
            return
        row_map = np.array([self._row(k) for k in other._rows], dtype=np.int64)
        col_map = np.array([self._column(s) for s in other._stats], dtype=np.int64)
        self._grow()
        r, c = (np.array(part, dtype=np.int64) for part in zip(*other._order))
        rows, cols = row_map[r], col_map[c]
        new = ~self._seen[rows, cols]
        self._order.extend(zip(rows[new].tolist(), cols[new].tolist()))
        self._seen[rows, cols] = True
        n_a, n_b = self._n[rows, cols], other._n[r, c]
        n = n_a + n_b
        mean_a, mean_b = self._mean[rows, cols], other._mean[r, c]
        delta = mean_b - mean_a
        share = np.where(n > 0, n_b / np.maximum(n, 1), 0.0)
        self._mean[rows, cols] = mean_a + delta * share
        self._m2[rows, cols] = self._m2[rows, cols] + other._m2[r, c] + delta**2 * n_a * share
        self._n[rows, cols] = n

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything needed to rebuild this accumulator: JSON-able metadata and arrays."""
        size = (len(self._rows), len(self._stats))
        meta = {"keys": self.keys, "rows": [[_plain(v) for v in k] for k in self._rows],
                "stats": list(self._stats), "order": [list(o) for o in self._order]}
        arrays = {"n": self._n[: size[0], : size[1]], "mean": self._mean[: size[0], : size[1]],
                  "m2": self._m2[: size[0], : size[1]], "seen": self._seen[: size[0], : size[1]]}
        return meta, {k: np.ascontiguousarray(v) for k, v in arrays.items()}

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]
                   ) -> SummaryAccumulator:
        """The accumulator :meth:`state` described."""
        out = cls(meta["keys"])
        out._rows = {tuple(k): i for i, k in enumerate(meta["rows"])}
        out._stats = {s: i for i, s in enumerate(meta["stats"])}
        out._n = arrays["n"].astype(np.int64).reshape(len(out._rows), len(out._stats))
        out._mean = arrays["mean"].astype(np.float64).reshape(out._n.shape)
        out._m2 = arrays["m2"].astype(np.float64).reshape(out._n.shape)
        out._seen = arrays["seen"].astype(bool).reshape(out._n.shape)
        out._order = [(int(r), int(c)) for r, c in meta["order"]]
        return out

    def table(self) -> pd.DataFrame:
        """Long form: keys, statistic, mean, std (ddof=1; empty below two images), n_images."""
        columns = [*self.keys, "statistic", "mean", "std", "n_images"]
        if not self._order:
            return pd.DataFrame(columns=columns)
        keys, stats = list(self._rows), list(self._stats)
        rows, cols = (np.array(part, dtype=np.int64) for part in zip(*self._order))
        n = self._n[rows, cols]
        out = {key: [keys[row][k] for row in rows.tolist()] for k, key in enumerate(self.keys)}
        out["statistic"] = [stats[col] for col in cols.tolist()]
        out["mean"] = np.where(n > 0, self._mean[rows, cols], np.nan)
        out["std"] = np.where(n > 1, np.sqrt(self._m2[rows, cols] / np.maximum(n - 1, 1)),
                              np.nan)
        out["n_images"] = n
        return pd.DataFrame(out, columns=columns)


def pairs_table(sim: SimilarityMatrix) -> pd.DataFrame:
    """The study's Table 1: every map pair, long form."""
    frames = []
    for ba in sim.blocks_a:
        for bb in sim.blocks_b:
            sub = sim.values[ba.start:ba.stop, bb.start:bb.stop]
            ia, ib = np.meshgrid(np.arange(ba.n_maps), np.arange(bb.n_maps), indexing="ij")
            frames.append(pd.DataFrame({
                "metric": sim.metric,
                "model_a": sim.model_a,
                "layer_a": ba.layer,
                "map_a": ia.ravel(),
                "model_b": sim.model_b,
                "layer_b": bb.layer,
                "map_b": ib.ravel(),
                "value": sub.ravel(),
                "dead_a": np.repeat(sim.dead_a[ba.start:ba.stop], bb.n_maps),
                "dead_b": np.tile(sim.dead_b[bb.start:bb.stop], ba.n_maps),
            }))
    return pd.concat(frames, ignore_index=True)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (for JSON)."""
    return value.item() if isinstance(value, np.generic) else value
