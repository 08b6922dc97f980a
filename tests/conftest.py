"""Shared fixtures: seeded random maps and small helpers."""

from __future__ import annotations

import signal

import numpy as np
import pytest

# A shell that starts the tests in the background (`pytest ... &` in a script) ignores SIGINT,
# and an ignored signal stays ignored in every process it starts: the tests that interrupt a
# `mapsim run` with SIGINT would see it ignored. Python's own handler makes the children start
# with the default disposition again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def relu_like_maps(rng: np.random.Generator, n_maps: int, height: int, width: int) -> np.ndarray:
    """Smooth, partly correlated, rectified maps (what a conv layer after ReLU looks like)."""
    base = rng.standard_normal((4, height, width))
    # a cheap smoothing so neighbouring pixels correlate
    for axis in (1, 2):
        base = (base + np.roll(base, 1, axis=axis) + np.roll(base, -1, axis=axis)) / 3
    mix = rng.standard_normal((n_maps, 4))
    maps = np.einsum("ck,khw->chw", mix, base) + 0.3 * rng.standard_normal((n_maps, height, width))
    return np.maximum(maps - 0.2, 0.0).astype(np.float32)
