"""``match``: an optimal one-to-one matching of the maps of two layers.

For every layer a of model A and layer b of model B, the maps of a are paired with distinct
maps of b by scipy's ``linear_sum_assignment`` on the (C_a, C_b) block of the similarity
matrix: as many pairs as possible are formed (min(C_a, C_b) when no map is dead), and among
those the sum of the values is the largest (the smallest for a distance). Dead maps take no
part (they are excluded like in ``max``), and within one model and one layer a map is never
paired with itself. Unlike ``max``, two maps of a never share a partner.

Tables: ``match`` (one row per map of a and layer b: the partner, its value and its rank among
that map's partners, 1 = its best partner) and ``match_layers`` (one row per layer pair: how
many maps were matched, statistics of the matched values, how often the match is the best
partner), which is summarised across images (``match_layers_summary.csv``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from mapsim import PIVOT_KEYS, Aggregator, SimilarityMatrix, hookimpl

MATCH_COLUMNS = ["metric", "model_a", "layer_a", "map_a", "model_b", "layer_b", "map_b",
                 "value", "rank", "dead_a", "dead_b"]
LAYER_COLUMNS = [*PIVOT_KEYS, "n_maps", "n_matched", "matched_mean", "matched_median",
                 "matched_std", "mean_rank", "pct_best"]


def assignment(values: np.ndarray, higher_is_more_similar: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the optimal one-to-one matching of ``values`` (NaN: not allowed).

    The most pairs of allowed entries, and among those the best sum; pairs are ordered by row.
    """
    allowed = ~np.isnan(values)
    if not allowed.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cost = -values if higher_is_more_similar else values.copy()
    finite = cost[allowed]
    # a penalty above any sum of allowed costs: every forbidden pair costs more than the
    # whole rest of an assignment, so the count of allowed pairs comes first
    span = float(finite.max() - finite.min())
    penalty = (span + 1.0) * (min(values.shape) + 1)
    cost = np.where(allowed, cost - finite.min(), penalty)
    rows, cols = linear_sum_assignment(cost)
    keep = allowed[rows, cols]
    return rows[keep], cols[keep]


def ranks(block: np.ndarray, rows: np.ndarray, cols: np.ndarray,
          higher_is_more_similar: bool) -> np.ndarray:
    """1 + the number of allowed partners of each matched row strictly better than its match."""
    chosen = block[rows, cols][:, None]
    others = block[rows]
    better = others > chosen if higher_is_more_similar else others < chosen
    return 1 + (better & ~np.isnan(others)).sum(axis=1)


def match_tables(sim: SimilarityMatrix) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``match`` and ``match_layers`` tables of one similarity matrix."""
    per_map, per_layer = [], []
    high = sim.higher_is_more_similar
    for ba in sim.blocks_a:
        for bb in sim.blocks_b:
            block = sim.values[ba.start:ba.stop, bb.start:bb.stop].astype(np.float64)
            if sim.same_model and ba.layer == bb.layer:  # a map is never its own partner
                block = block.copy()
                k = np.arange(min(ba.n_maps, bb.n_maps))
                block[k, k] = np.nan
            rows, cols = assignment(block, high)
            rank = ranks(block, rows, cols, high)
            partner = pd.array([pd.NA] * ba.n_maps, dtype="Int64")
            partner[rows] = cols
            value = np.full(ba.n_maps, np.nan)
            value[rows] = block[rows, cols]
            rank_col = pd.array([pd.NA] * ba.n_maps, dtype="Int64")
            rank_col[rows] = rank
            dead_b = pd.array([pd.NA] * ba.n_maps, dtype="boolean")
            dead_b[rows] = sim.dead_b[bb.start:bb.stop][cols]
            per_map.append(pd.DataFrame({
                "metric": sim.metric, "model_a": sim.model_a, "layer_a": ba.layer,
                "map_a": np.arange(ba.n_maps), "model_b": sim.model_b, "layer_b": bb.layer,
                "map_b": partner, "value": value, "rank": rank_col,
                "dead_a": sim.dead_a[ba.start:ba.stop].astype(bool), "dead_b": dead_b,
            }, columns=MATCH_COLUMNS))
            matched = block[rows, cols]
            per_layer.append({
                "metric": sim.metric, "model_a": sim.model_a, "layer_a": ba.layer,
                "model_b": sim.model_b, "layer_b": bb.layer, "n_maps": ba.n_maps,
                "n_matched": len(rows),
                "matched_mean": matched.mean() if len(rows) else np.nan,
                "matched_median": np.median(matched) if len(rows) else np.nan,
                "matched_std": matched.std(ddof=1) if len(rows) > 1 else np.nan,
                "mean_rank": rank.mean() if len(rows) else np.nan,
                "pct_best": 100.0 * (rank == 1).mean() if len(rows) else np.nan,
            })
    if not per_map:
        return pd.DataFrame(columns=MATCH_COLUMNS), pd.DataFrame(columns=LAYER_COLUMNS)
    return (pd.concat(per_map, ignore_index=True),
            pd.DataFrame(per_layer, columns=LAYER_COLUMNS))


class MatchAggregator(Aggregator):
    """``match.csv`` and ``match_layers.csv``: an optimal one-to-one matching of the maps of
    every layer pair (``linear_sum_assignment``); ``match_layers`` is summarised across
    images."""

    name = "match"
    order = 50
    summarise = {"match_layers": PIVOT_KEYS}

    def aggregate(self, sim: SimilarityMatrix, tables: dict[str, pd.DataFrame]
                  ) -> dict[str, pd.DataFrame]:
        per_map, per_layer = match_tables(sim)
        return {"match": per_map, "match_layers": per_layer}


@hookimpl
def register_aggregators(register) -> None:
    """Register ``match``."""
    register(MatchAggregator)
