"""The observer a run tells what it computes (the pictures are one; see ``mapsim.plots``)."""

from __future__ import annotations

from abc import ABC
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mapsim.api import ImageItem
from mapsim.types import SimilarityMatrix

if TYPE_CHECKING:  # pragma: no cover
    import torch


class RunObserver(ABC):
    """Watches a run without taking part in its tables (the pictures are one).

    A run calls the hooks below in image order on the process that computes each image; a
    run in blocks (every run) hands :meth:`block_state` to the block's saved state, and the
    merge gives it back through :meth:`add_block_state` in block order, so an observer sees
    the same data with ``--resume`` and under torchrun. :meth:`write` puts files into the
    results directory before it is published; :meth:`finished` runs after the run returns
    its published directory (draw there).
    """

    #: the name of this observer's part of a block's state
    key: ClassVar[str] = "observer"

    #: True when :meth:`on_maps` needs the maps: the run then keeps the maps of the images
    #: :meth:`wants_maps` names instead of streaming their moments (the fast path)
    needs_maps: ClassVar[bool] = False

    def wants_maps(self, index: int) -> bool:
        """Whether :meth:`on_maps` needs the maps of the run's image ``index`` (default:
        every image when ``needs_maps``). The other images stream."""
        return self.needs_maps

    def on_maps(self, index: int, item: ImageItem,
                maps: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """One image's captured maps ``{model: {layer: (C, H, W)}}`` (the images
        :meth:`wants_maps` names); ``index`` is the image's place in the run."""

    def on_matrix(self, image_id: str, sim: SimilarityMatrix) -> None:
        """One similarity matrix of one image (each direction of a comparison)."""

    def block_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What was kept since the last call (JSON-able metadata, named arrays)."""
        return {}, {}

    def add_block_state(self, meta: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Take back one block's :meth:`block_state` (blocks in image order)."""

    def write(self, staging: Path) -> None:
        """Write files into the results directory (``staging``) before it is published."""

    def finished(self, out_dir: Path) -> None:
        """After the results are published in ``out_dir``."""
