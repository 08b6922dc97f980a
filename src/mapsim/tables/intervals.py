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

import warnings
from collections.abc import Sequence

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
                        resamples: int = RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """``keys + [statistic, ci_low, ci_high, ci_method]`` for every key and numeric column of
    ``per_image`` (one row per image and key; NaN values are left out, as in the means)."""
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
        low, high, method = _vectorised(data, level, resamples, rng)
        rows.extend((*key, stat, lo, hi, m)
                    for (key, stat, _), lo, hi, m in zip(items, low, high, method))
    frame = pd.DataFrame(rows, columns=columns)
    return frame


def _vectorised(data: np.ndarray, level: float, resamples: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """BCa intervals of the mean of each row of ``data`` (rows x images), with the percentile
    interval for few images and for the rows where BCa is undefined."""
    if data.shape[1] >= BCA_MIN_IMAGES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate BCa rows are handled below
            bca = stats.bootstrap((data,), np.mean, n_resamples=resamples, axis=-1,
                                  vectorized=True, confidence_level=level, method="BCa",
                                  rng=rng)
        low = np.asarray(bca.confidence_interval.low, dtype=float).reshape(-1)
        high = np.asarray(bca.confidence_interval.high, dtype=float).reshape(-1)
    else:
        low = np.full(len(data), np.nan)
        high = np.full(len(data), np.nan)
    method = ["BCa"] * len(data)
    bad = ~(np.isfinite(low) & np.isfinite(high))
    if bad.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pct = stats.bootstrap((data[bad],), np.mean, n_resamples=resamples, axis=-1,
                                  vectorized=True, confidence_level=level,
                                  method="percentile", rng=rng)
        low[bad] = np.asarray(pct.confidence_interval.low).reshape(-1)
        high[bad] = np.asarray(pct.confidence_interval.high).reshape(-1)
        for index in np.flatnonzero(bad):
            method[index] = "percentile"
    return low, high, method


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
