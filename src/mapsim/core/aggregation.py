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

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from mapsim.core.similarity import SimilarityMatrix

PARTNER_COLUMNS = [
    "metric", "model_a", "layer_a", "map_a", "model_b", "layer_b", "map_b", "value",
    "dead_a", "dead_b",
]
PIVOT_KEYS = ("metric", "model_a", "layer_a", "model_b", "layer_b")


def partners(sim: SimilarityMatrix, best: bool = True) -> pd.DataFrame:
    """For each map of A and each layer of B: its best (or worst) partner and the value.

    A map with no eligible partner (it is dead, or every map of b is) gets an empty partner
    and value; its ``dead_a`` flag says why. Rows are ordered by layer of A, layer of B, map
    of A. Vectorised over the maps of A: one pass per layer of B.
    """
    prefer_high = sim.higher_is_more_similar == best
    filler = -np.inf if prefer_high else np.inf
    n_a = sim.values.shape[0]
    rows = np.arange(n_a)
    partner, value, has = [], [], []
    for bb in sim.blocks_b:
        sub = sim.values[:, bb.start:bb.stop].copy()
        if sim.same_model:
            for ba in sim.blocks_a:
                if ba.layer == bb.layer:
                    np.fill_diagonal(sub[ba.start:ba.stop], np.nan)
        valid = ~np.isnan(sub)
        scored = np.where(valid, sub, filler)
        idx = scored.argmax(axis=1) if prefer_high else scored.argmin(axis=1)
        ok = valid.any(axis=1)
        partner.append(idx)
        value.append(np.where(ok, sub[rows, idx], np.nan))
        has.append(ok)
    partner_b, value_b, has_b = np.array(partner), np.array(value), np.array(has)  # (nb, n_a)
    dead_of_partner = np.array([sim.dead_b[bb.start:bb.stop][idx]
                                for bb, idx in zip(sim.blocks_b, partner_b)])
    n_b = len(sim.blocks_b)

    def order(values: np.ndarray) -> np.ndarray:  # (nb, n_a) -> layer a, layer b, map a
        return np.concatenate([values[:, ba.start:ba.stop].reshape(-1) for ba in sim.blocks_a])

    has_all = order(has_b)
    map_b = pd.array(np.where(has_all, order(partner_b), 0), dtype="Int64")
    map_b[~has_all] = pd.NA
    dead_b = pd.array(np.where(has_all, order(dead_of_partner), False), dtype="boolean")
    dead_b[~has_all] = pd.NA
    return pd.DataFrame({
        "metric": sim.metric,
        "model_a": sim.model_a,
        "layer_a": np.repeat([ba.layer for ba in sim.blocks_a],
                             [ba.n_maps * n_b for ba in sim.blocks_a]),
        "map_a": np.concatenate([np.tile(np.arange(ba.n_maps), n_b) for ba in sim.blocks_a]),
        "model_b": sim.model_b,
        "layer_b": np.concatenate([np.repeat([bb.layer for bb in sim.blocks_b], ba.n_maps)
                                   for ba in sim.blocks_a]),
        "map_b": map_b,
        "value": order(value_b),
        "dead_a": np.concatenate([np.tile(sim.dead_a[ba.start:ba.stop], n_b)
                                  for ba in sim.blocks_a]),
        "dead_b": dead_b,
    })


def passes(values: pd.Series, threshold: float, higher_is_more_similar: bool) -> pd.Series:
    """Whether each best value passes ``threshold`` (NaN never passes)."""
    ok = values >= threshold if higher_is_more_similar else values <= threshold
    return ok.fillna(False).astype(bool)


def pivot(best: pd.DataFrame, threshold: float, higher_is_more_similar: bool) -> pd.DataFrame:
    """The study's Table 3 from a best-partner table (one row per layer pair).

    Vectorised: groups are numbered once and every statistic is a grouped reduction.
    """
    columns = [*PIVOT_KEYS, "threshold", "n_maps", "n_dead", "n_live", "best_mean",
               "best_median", "best_std", "n_well", "pct_well", "well_mean", "well_median",
               "well_std"]
    if best.empty:
        return pd.DataFrame(columns=columns)
    codes = best.groupby(list(PIVOT_KEYS), sort=False).ngroup().to_numpy()
    n_groups = int(codes.max()) + 1
    values = best["value"].to_numpy(dtype=float)
    live = ~np.isnan(values)
    well = live & passes(best["value"], threshold, higher_is_more_similar).to_numpy()
    n_maps = np.bincount(codes, minlength=n_groups)
    out = best.groupby(codes, sort=True)[list(PIVOT_KEYS)].first().reset_index(drop=True)
    out["threshold"] = threshold
    out["n_maps"] = n_maps
    out["n_dead"] = np.bincount(codes, weights=best["dead_a"].to_numpy(dtype=float),
                                minlength=n_groups).astype(int)
    out["n_live"] = np.bincount(codes, weights=live, minlength=n_groups).astype(int)
    for prefix, keep in (("best", live), ("well", well)):
        grouped = pd.Series(np.where(keep, values, np.nan)).groupby(codes, sort=True)
        if prefix == "well":
            n_well = np.bincount(codes, weights=keep, minlength=n_groups).astype(int)
            out["n_well"] = n_well
            out["pct_well"] = 100.0 * n_well / n_maps
        out[f"{prefix}_mean"] = grouped.mean().to_numpy()
        out[f"{prefix}_median"] = grouped.median().to_numpy()
        out[f"{prefix}_std"] = grouped.std(ddof=1).to_numpy()
    return out[columns]


class SummaryAccumulator:
    """Mean and sample std of numeric columns across images, streamed (Welford, float64).

    Memory is O(rows of one image's table), whatever the number of images. A value that is
    undefined for an image (NaN) is skipped; ``n_images`` counts the images that had one.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self._state: dict[tuple, list[float]] = {}  # (key..., stat) -> [n, mean, m2]
        self._order: list[tuple] = []

    def add(self, table: pd.DataFrame, skip: Iterable[str] = ()) -> None:
        """Add one image's table (one row per key)."""
        skip = set(skip) | set(self.keys)
        stats = [c for c in table.columns
                 if c not in skip and pd.api.types.is_numeric_dtype(table[c])
                 and not pd.api.types.is_bool_dtype(table[c])]
        keys = zip(*(table[k].tolist() for k in self.keys)) if self.keys else \
            (() for _ in range(len(table)))
        values = table[stats].to_numpy(dtype=float, na_value=np.nan) if stats else None
        for index, key in enumerate(keys):
            key = tuple(key)
            for column, stat in enumerate(stats):
                value = float(values[index, column])
                slot = key + (stat,)
                state = self._state.get(slot)
                if state is None:
                    state = self._state[slot] = [0, 0.0, 0.0]
                    self._order.append(slot)
                if math.isnan(value):
                    continue
                n, mean, m2 = state
                n += 1
                delta = value - mean
                mean += delta / n
                m2 += delta * (value - mean)
                state[:] = [n, mean, m2]

    def table(self) -> pd.DataFrame:
        """Long form: keys, statistic, mean, std (ddof=1; empty below two images), n_images."""
        rows = []
        for slot in self._order:
            n, mean, m2 = self._state[slot]
            rows.append({
                **dict(zip(self.keys, slot[:-1])),
                "statistic": slot[-1],
                "mean": mean if n else math.nan,
                "std": math.sqrt(m2 / (n - 1)) if n > 1 else math.nan,
                "n_images": n,
            })
        return pd.DataFrame(rows, columns=[*self.keys, "statistic", "mean", "std", "n_images"])


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
