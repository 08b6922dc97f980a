"""The base class of pruning criteria and the values they see and return.

A criterion plugin subclasses :class:`PruneCriterion` (imported from ``mapsim``) and
registers it from a ``register_prune_criteria`` hook implementation::

    from mapsim import PruneChoice, PruneCriterion, hookimpl

    class Smallest(PruneCriterion):
        name = "smallest-bias"

        def choose(self, layer, n_remove, rng):
            return PruneChoice.lowest(layer.bias.abs(), n_remove)

    @hookimpl
    def register_prune_criteria(register):
        register(Smallest)
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from mapsim.api import Plugin
from mapsim.types import Moments


@dataclass(frozen=True)
class PruneLayer:
    """What a criterion knows about one prunable layer (a conv module of the network).

    Attributes:
        name: module path of the layer whose output maps are pruned (e.g. ``blocks.1``).
        weight: (C, C_in, k, k) weights of the layer's convolution.
        bias: (C,) bias of the convolution, or None.
        gamma: (C,) batch-norm scale (``bn.weight``), or None without a batch norm.
        moments: :class:`~mapsim.Moments` of the layer's C output maps (after the ReLU) over
            every pixel of the calibration images.
        maps: (N, C, H, W) the output maps on the N calibration images.
    """

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    gamma: torch.Tensor | None
    moments: Moments
    maps: torch.Tensor

    @property
    def n_maps(self) -> int:
        """Number of output maps C."""
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class PruneChoice:
    """The maps a criterion removes from one layer.

    Attributes:
        remove: indices of the removed maps (original numbering), sorted.
        partners: for compensation, removed map -> the kept map whose affine function
            replaces it (see :mod:`mapsim.pruning.compensate`); empty: no compensation.
    """

    remove: tuple[int, ...]
    partners: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def lowest(cls, scores: torch.Tensor | np.ndarray, n_remove: int) -> PruneChoice:
        """Remove the ``n_remove`` maps with the lowest scores (ties: the lower index)."""
        values = np.asarray(torch.as_tensor(scores).detach().double().cpu())
        order = np.argsort(values, kind="stable")
        return cls(tuple(sorted(int(i) for i in order[:n_remove])))


class PruneCriterion(Plugin):
    """Chooses which maps of a layer to remove.

    ``choose`` is called with ``n_remove`` (an exact count, at a requested sparsity) or, when
    the criterion sets ``supports_threshold`` and the spec gives a threshold, with
    ``n_remove=None``: then the criterion decides the count itself.
    """

    #: whether ``choose`` accepts ``n_remove=None`` (a threshold given in the params)
    supports_threshold: ClassVar[bool] = False
    #: whether ``choose`` draws from ``rng``; a criterion that does not (the same choice for
    #: every seed) is pruned and scored once for a model with weights, and only the
    #: fine-tuning is repeated per seed
    uses_rng: ClassVar[bool] = True

    @abstractmethod
    def choose(self, layer: PruneLayer, n_remove: int | None,
               rng: np.random.Generator) -> PruneChoice:
        """The maps of ``layer`` to remove; exactly ``n_remove`` of them when it is given.
        ``rng`` is seeded from the spec's seed (use it for any randomness)."""
