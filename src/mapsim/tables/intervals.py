"""Confidence intervals of the across-image means: a bootstrap over images.

Every row of ``summary.csv`` (and ``layer_similarity_summary.csv``) is the mean over images
of one statistic for one layer pair. Its interval comes from resampling the images with
replacement (``scipy.stats.bootstrap``): BCa (bias-corrected and accelerated) from
:data:`BCA_MIN_IMAGES` images on, where it is defined; the percentile interval below that
(with a handful of images the bootstrap means take few distinct values, many equal to the
observed mean, and BCa's bias correction then jumps with the last bit of a value) or where BCa
is undefined; the value itself when every image gives the same value; and no interval (empty
cells, the reason in ``ci_method``) with fewer than two images.

The intervals are computed once, when the results are published, from the per-image rows the
run has written (``pivot.csv``, ``layer_similarity.csv``), in image order, with a fixed seed:
one process, a torchrun job and a resumed run write the same per-image rows, and so the same
intervals.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from scipy import stats

#: the seed of the bootstrap resampling (the intervals are reproducible)
SEED = 0
#: resamples per interval
RESAMPLES = 9999
#: fewer images than this get the percentile interval (see the module docstring)
BCA_MIN_IMAGES = 10


def bootstrap_intervals(per_image: pd.DataFrame, keys: Sequence[str], level: float,
                        resamples: int = RESAMPLES, seed: int = SEED,
                        workers: int | None = None) -> pd.DataFrame:
    """``keys + [statistic, ci_low, ci_high, ci_method]`` for every key and numeric column of
    ``per_image`` (one row per image and key; NaN values are left out, as in the means).
    ``workers``: threads (default: up to :data:`MAX_WORKERS`, no more than the CPUs); the
    intervals do not depend on it."""
    if workers is None:
        workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    columns = [*keys, "statistic", "ci_low", "ci_high", "ci_method"]
    numeric = [c for c, dtype in per_image.dtypes.items()
               if c not in keys and c != "image" and pd.api.types.is_numeric_dtype(dtype)
               and not pd.api.types.is_bool_dtype(dtype)]
    if per_image.empty or not numeric:
        return pd.DataFrame(columns=columns)
    rows: list[tuple] = []
    pending: dict[int, list[tuple[tuple, str, np.ndarray]]] = {}  # n -> (key, stat, values)
    for key, group in per_image.groupby(list(keys), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for stat in numeric:
            values = group[stat].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if len(values) < 2:
                rows.append((*key, stat, np.nan, np.nan,
                             f"none: {len(values)} image(s) with a value"))
            elif np.all(values == values[0]):
                rows.append((*key, stat, values[0], values[0], "constant"))
            else:
                pending.setdefault(len(values), []).append((key, stat, values))
    rng = np.random.default_rng(seed)
    for n, items in pending.items():
        data = np.stack([values for _, _, values in items])
        low, high, method = _vectorised(data, level, resamples, rng, workers)
        rows.extend((*key, stat, lo, hi, m)
                    for (key, stat, _), lo, hi, m in zip(items, low, high, method))
    frame = pd.DataFrame(rows, columns=columns)
    return frame


#: bootstrap means held at once by one worker (rows x resamples, float64): bounds the memory
MAX_CELLS = 2_000_000
#: threads that compute chunks of rows at once (at most; never more than the CPUs)
MAX_WORKERS = 4


def _vectorised(data: np.ndarray, level: float, resamples: int, rng: np.random.Generator,
                workers: int = 1) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Bootstrap intervals of the mean of each row of ``data`` (rows x images): BCa from
    :data:`BCA_MIN_IMAGES` images on where defined, else percentile.

    The mean of a resample is ``counts @ values / n`` with ``counts`` the (resamples x n)
    multinomial draw counts, one draw shared by every row (as ``scipy.stats.bootstrap``
    resamples every batch element with the same indices): one matrix product per chunk of
    rows, so time and memory grow with rows x resamples, not rows x resamples x images. BCa
    and the percentile interval follow Efron and Tibshirani (1993), as scipy computes them;
    tests compare both with ``scipy.stats.bootstrap``. The chunks are independent (one draw
    for all), so ``workers`` threads give the same intervals as one.
    """
    rows, n = data.shape
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)
    alpha = (1.0 - level) / 2.0
    low = np.empty(rows)
    high = np.empty(rows)
    bca_used = np.zeros(rows, dtype=bool)
    step = max(1, MAX_CELLS // resamples)

    def chunk_intervals(start: int) -> None:
        chunk = data[start:start + step]
        boot = chunk @ counts.T / n  # (chunk rows, resamples)
        theta = chunk.mean(axis=1)
        quantiles = np.tile([alpha, 1.0 - alpha], (len(chunk), 1))
        if n >= BCA_MIN_IMAGES:
            bca = _bca_quantiles(chunk, boot, theta, alpha)
            ok = np.all(np.isfinite(bca), axis=1)
            quantiles[ok] = bca[ok]
            bca_used[start:start + step] = ok
        positions = quantiles * (resamples - 1)
        below = np.floor(positions).astype(int)
        above = np.minimum(below + 1, resamples - 1)
        weight = positions - below
        ranks = np.concatenate([below, above], axis=1)  # (rows, 4): the order statistics used
        picked = _order_statistics(boot, ranks)
        picked = picked[:, :2] * (1 - weight) + picked[:, 2:] * weight
        low[start:start + step] = picked[:, 0]
        high[start:start + step] = picked[:, 1]

    starts = range(0, rows, step)
    workers = min(workers, len(starts))
    if workers <= 1:
        for start in starts:
            chunk_intervals(start)
    else:  # numpy's products, comparisons and selections release the GIL
        with ThreadPoolExecutor(workers, thread_name_prefix="mapsim-intervals") as pool:
            list(pool.map(chunk_intervals, starts))
    method = ["BCa" if used else "percentile" for used in bca_used]
    return low, high, method


def _order_statistics(values: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``values[i]`` sorted, at ``ranks[i]`` (rows x k): a partial sort of each row (a few
    selections instead of sorting every resample, which took most of the publishing time of
    a run with thousands of summary rows); rows that need the same ranks are selected
    together."""
    out = np.empty(ranks.shape)
    distinct, rows_of = np.unique(ranks, axis=0, return_inverse=True)
    for which, kth in enumerate(distinct):
        rows = np.flatnonzero(rows_of.reshape(-1) == which)
        kth_sorted = np.unique(kth)
        part = np.partition(values[rows], kth_sorted, axis=1)
        out[rows] = part[:, kth]
    return out


def _bca_quantiles(data: np.ndarray, boot: np.ndarray, theta: np.ndarray,
                   alpha: float) -> np.ndarray:
    """The BCa-adjusted lower and upper quantiles (rows x 2); NaN where undefined."""
    n = data.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        z0 = stats.norm.ppf(np.mean(boot < theta[:, None], axis=1))
        jack = (data.sum(axis=1, keepdims=True) - data) / (n - 1)  # leave-one-out means
        spread = jack.mean(axis=1, keepdims=True) - jack
        accel = (spread ** 3).sum(axis=1) / (6.0 * (spread ** 2).sum(axis=1) ** 1.5)
        out = np.empty((len(data), 2))
        for column, tail in enumerate((alpha, 1.0 - alpha)):
            z = stats.norm.ppf(tail)
            out[:, column] = stats.norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    return out


def with_intervals(summary: pd.DataFrame, intervals: pd.DataFrame,
                   keys: Sequence[str]) -> pd.DataFrame:
    """``summary`` (keys, statistic, mean, std, n_images) with ``ci_low``, ``ci_high`` and
    ``ci_method`` joined on the keys and the statistic (rows and their order unchanged)."""
    on = [*keys, "statistic"]
    if summary.empty:
        return summary.assign(ci_low=pd.Series(dtype=float), ci_high=pd.Series(dtype=float),
                              ci_method=pd.Series(dtype=str))
    right = intervals.astype({k: summary[k].dtype for k in on if k in intervals})
    merged = summary.merge(right, on=on, how="left", validate="one_to_one")
    missing = merged["ci_method"].isna()
    merged.loc[missing, "ci_method"] = "none: no per-image values"
    return merged
