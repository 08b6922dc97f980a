"""The fixed-seed split of a set of images into a training and a validation part.

One function, shared by ``mapsim train`` (which validates on the validation part) and the
``folder`` dataset (whose ``split: validation`` selects exactly those images).
"""

from __future__ import annotations

import numpy as np

from mapsim.errors import SpecError


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Fixed-seed split of ``range(n)`` into (training, validation) indices, each sorted.

    The validation part holds ``round(n * fraction)`` images, at least one; the training part
    at least one. The permutation comes from ``numpy.random.RandomState(seed)``, whose stream
    NumPy keeps stable across versions.

    :raises SpecError: fewer than two images.
    """
    if n < 2:
        raise SpecError(
            f"split: {n} labelled image(s) cannot be split into training and validation images; "
            "give at least two, or a separate 'validation' data set."
        )
    n_val = min(max(1, int(round(n * fraction))), n - 1)
    order = np.random.RandomState(seed).permutation(n)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])
