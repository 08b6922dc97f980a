"""Chance levels: ``baselines.csv`` and ``map_pvalues.csv`` from the per-image rows.

Both are computed once, when the results are published, from per-image rows the run has
written in image order (``pivot.csv``, ``max.csv`` and their spatial-null twins
``null/pivot.csv``, ``null/max.csv``; :mod:`mapsim.engine.null`), so one process, a torchrun
job and a resumed run give the same tables.

``baselines.csv``: per layer pair, threshold and statistic (``best_mean``, ``pct_well``) and
baseline (``spatial-null``; ``untrained`` where asked for), the observed mean over images,
the baseline's mean and 95th percentile over its draws (one null draw per image; one value
per initialisation for ``untrained``), the number of draws ``n``, and ``above``: observed >
p95.

``map_pvalues.csv``: per map of model a and layer of model b, the empirical p-value of its
best partner. The test is paired across images: on image k the map's observed best value
``o_k`` and its best value under the null ``z_k`` (same image, partner shifted) give
``d_k = o_k - z_k`` (``z_k - o_k`` for a distance). When the maps are unrelated and
spatially stationary, the shifted partner is as good a partner as the real one, so ``o_k``
and ``z_k`` are exchangeable and ``d_k`` is symmetric about 0; with images independent, the
sign-flip permutation test of ``mean(d)`` is then exact: p = share of sign vectors whose
flipped mean is >= the observed one (every vector enumerated when ``2**n <= flips + 1``, else
``flips`` random vectors and the identity: p = (1 + count) / (1 + flips)). One-sided: only a
partner better than chance counts. The smallest p is ``2**-n``: with 5 images or fewer no map
can reach p < 0.05. ``q`` is the Benjamini-Hochberg adjusted p-value
(``scipy.stats.false_discovery_control``) within each family of one layer pair (the maps of
layer a against layer b), ``significant`` is ``q < fdr``; ``partner`` is the map's most
frequent best partner over images and ``observed`` its mean best value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from mapsim.tables.aggregation import PIVOT_KEYS

BASELINE_COLUMNS = ["metric", "model_a", "layer_a", "model_b", "layer_b", "threshold",
                    "statistic", "baseline", "observed", "mean", "p95", "n", "above"]
PVALUE_COLUMNS = ["metric", "model_a", "layer_a", "model_b", "layer_b", "map", "partner",
                  "observed", "p", "q", "significant"]
#: the summary statistics that get chance levels
STATISTICS = ("best_mean", "pct_well")
SPATIAL_NULL = "spatial-null"
UNTRAINED = "untrained"
#: image ids of rows that are not one image (computed across images, or pooled)
NOT_IMAGES = ("all-images", "pooled")
_KEYS = [*PIVOT_KEYS, "threshold"]


def read_rows(path: Path) -> pd.DataFrame | None:
    """A per-image table written by the run (rows of single images only), or None."""
    if not path.is_file():
        return None
    frame = pd.read_csv(path, dtype={k: str for k in ("image", *PIVOT_KEYS, "map_a", "map_b")},
                        keep_default_na=False, na_values=[""])
    return frame[~frame["image"].isin(NOT_IMAGES)]


def baselines(observed: pd.DataFrame, null: pd.DataFrame,
              baseline: str = SPATIAL_NULL) -> pd.DataFrame:
    """``baselines.csv`` rows of one baseline: ``observed`` and ``null`` are per-draw pivot
    rows (``pivot.csv`` and ``null/pivot.csv``: one row per image and layer pair; for
    ``untrained``, one row per initialisation). NaN values (no live map) are left out."""
    rows = []
    observed_means = {}
    for key, group in observed.groupby(_KEYS, sort=False, dropna=False):
        for statistic in STATISTICS:
            values = group[statistic].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            observed_means[(*key, statistic)] = values.mean() if len(values) else np.nan
    for key, group in null.groupby(_KEYS, sort=False, dropna=False):
        for statistic in STATISTICS:
            values = group[statistic].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            seen = observed_means.get((*key, statistic), np.nan)
            if len(values):
                mean, p95 = float(values.mean()), float(np.percentile(values, 95))
            else:
                mean = p95 = np.nan
            rows.append((*key, statistic, baseline, seen, mean, p95, len(values),
                         bool(np.isfinite(seen) and np.isfinite(p95) and seen > p95)))
    return pd.DataFrame(rows, columns=BASELINE_COLUMNS)


def sign_flip_pvalues(d: np.ndarray, flips: int, seed: int) -> np.ndarray:
    """One-sided sign-flip p-values of ``mean(d) > 0`` for every row of ``d`` (maps x
    images; NaN entries are left out of their row). All ``2**n`` sign vectors when that is at
    most ``flips + 1``, else ``flips`` random ones (one draw shared by rows with the same
    images, seeded) and the identity. NaN for a row with no value."""
    out = np.full(d.shape[0], np.nan)
    finite = np.isfinite(d)
    patterns: dict[bytes, list[int]] = {}
    for row in range(d.shape[0]):
        if finite[row].any():
            patterns.setdefault(finite[row].tobytes(), []).append(row)
    for key, rows in patterns.items():
        keep = np.frombuffer(key, dtype=bool)
        data = d[np.ix_(rows, np.flatnonzero(keep))]
        n = data.shape[1]
        if 2 ** n <= flips + 1:
            signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
            plus_one = 0
        else:
            rng = np.random.default_rng([int(seed), n])
            signs = rng.choice([-1.0, 1.0], size=(flips, n))
            plus_one = 1
        observed = data.mean(axis=1)
        tolerance = 1e-12 * np.maximum(1.0, np.abs(data).max(axis=1))
        count = np.zeros(len(rows))
        for start in range(0, len(signs), 4096):
            flipped = data @ signs[start:start + 4096].T / n
            count += (flipped >= (observed - tolerance)[:, None]).sum(axis=1)
        out[rows] = (count + plus_one) / (len(signs) + plus_one)
    return out


def map_pvalues(observed: pd.DataFrame, null: pd.DataFrame, higher_is_better: dict[str, bool],
                flips: int, seed: int, fdr: float) -> pd.DataFrame:
    """``map_pvalues.csv`` from the per-image best-partner rows (``max.csv`` and
    ``null/max.csv``); ``higher_is_better``: metric label -> whether it is a similarity."""
    keys = ["metric", "model_a", "layer_a", "map_a", "model_b", "layer_b"]
    if observed.empty or null.empty:
        return pd.DataFrame(columns=PVALUE_COLUMNS)
    left = observed[["image", *keys, "map_b", "value"]]
    right = null[["image", *keys, "value"]].rename(columns={"value": "null"})
    both = left.merge(right, on=["image", *keys], how="inner", validate="one_to_one")
    both["_code"] = both.groupby(keys, sort=False, dropna=False).ngroup()  # first-seen order
    images = list(dict.fromkeys(both["image"]))
    sign = np.where(both["metric"].map(lambda m: higher_is_better.get(m, True)), 1.0, -1.0)
    both["d"] = sign * (both["value"].to_numpy(float) - both["null"].to_numpy(float))
    n_keys = int(both["_code"].max()) + 1
    grid = both.pivot(index="_code", columns="image", values="d").reindex(
        index=range(n_keys), columns=images)
    p = sign_flip_pvalues(grid.to_numpy(dtype=float), flips, seed)
    frame = both.drop_duplicates("_code")[keys].reset_index(drop=True)
    frame["partner"] = _modes(both, n_keys)
    frame["observed"] = both.groupby("_code", sort=True)["value"].mean().reindex(
        range(n_keys)).to_numpy()
    frame["p"] = p
    frame["q"] = np.nan
    for index in frame.groupby(list(PIVOT_KEYS), sort=False).groups.values():
        values = frame.loc[index, "p"].to_numpy()
        ok = np.isfinite(values)
        if ok.any():
            q = np.full(len(values), np.nan)
            q[ok] = stats.false_discovery_control(values[ok], method="bh")
            frame.loc[index, "q"] = q
    frame["significant"] = frame["q"].to_numpy() < fdr
    return frame.rename(columns={"map_a": "map"})[PVALUE_COLUMNS]


def _modes(both: pd.DataFrame, n_keys: int) -> np.ndarray:
    """Each key's most frequent best partner over images (the first seen among equals);
    empty where no image gave one."""
    partners = both["map_b"].astype(str)
    valid = both[both["map_b"].notna() & (partners != "") & (partners != "nan")]
    out = np.full(n_keys, "", dtype=object)
    if valid.empty:
        return out
    counts = valid.groupby(["_code", "map_b"], sort=False).size().reset_index(name="n")
    counts = counts.sort_values(["_code", "n"], ascending=[True, False], kind="stable")
    first = counts.drop_duplicates("_code")
    out[first["_code"].to_numpy()] = first["map_b"].astype(str).to_numpy()
    return out


def chance_tables(folder: Path, higher_is_better: dict[str, bool], flips: int, seed: int,
                  fdr: float, prefix: str = "null/",
                  untrained: pd.DataFrame | None = None
                  ) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """``(baselines, map_pvalues)`` from the per-image rows in ``folder``; None for a table
    whose inputs the run did not write (e.g. no ``pivot`` aggregator). ``untrained``: the
    untrained baseline's per-initialisation pivot rows, if any."""
    pivot, null_pivot = read_rows(folder / "pivot.csv"), read_rows(folder / f"{prefix}pivot.csv")
    best, null_best = read_rows(folder / "max.csv"), read_rows(folder / f"{prefix}max.csv")
    parts = []
    if pivot is not None and null_pivot is not None:
        parts.append(baselines(pivot, null_pivot, SPATIAL_NULL))
    if pivot is not None and untrained is not None and not untrained.empty:
        parts.append(baselines(pivot, untrained, UNTRAINED))
    if parts:  # one row order whatever the baselines: by layer pair, statistic, baseline
        order = {k: i for i, k in enumerate(dict.fromkeys(zip(*(parts[0][c] for c in _KEYS))))}
        for part in parts[1:]:
            for key in zip(*(part[c] for c in _KEYS)):
                order.setdefault(key, len(order))
    table = None
    if parts:
        table = pd.concat(parts, ignore_index=True)
        rank = [order[k] for k in zip(*(table[c] for c in _KEYS))]
        table = table.assign(_rank=rank).sort_values(["_rank", "statistic", "baseline"],
                                                     kind="stable").drop(columns="_rank")
        table = table.reset_index(drop=True)
    pvalues = None
    if best is not None and null_best is not None:
        pvalues = map_pvalues(best, null_best, higher_is_better, flips, seed, fdr)
    return table, pvalues


def families(frame: pd.DataFrame, keys: Sequence[str] = PIVOT_KEYS) -> int:
    """How many Benjamini-Hochberg families ``map_pvalues`` has (for run.json)."""
    return 0 if frame is None or frame.empty else int(frame.groupby(list(keys)).ngroups)
