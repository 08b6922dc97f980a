"""What a run keeps for its pictures: small map thumbnails and the per-image similarity matrices.

Only the first ``output.plot_images`` images are kept. Thumbnails are float16, area-averaged
down to at most :data:`THUMB_PX` pixels on their longer side; matrices are float32 and only
kept up to :data:`MAX_MATRIX_CELLS` cells per comparison. Files:
``thumbnails/<image>.npz`` and ``matrices/<image>.npz`` plus an ``index.json`` in each folder
mapping image ids to file names.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mapsim.plots.io import atomic_write_bytes, slug

THUMB_PX = 96
INPUT_PX = 192
MAX_MATRIX_CELLS = 4_000_000
KEY_SEP = "\x1f"


def thumb_key(model: str, layer: str) -> str:
    """The key of one layer's thumbnails in a thumbnails file."""
    return f"{model}{KEY_SEP}{layer}"


def matrix_key(metric: str, model_a: str, model_b: str) -> str:
    """The key of one comparison direction's matrix in a matrices file."""
    return f"{metric}{KEY_SEP}{model_a}{KEY_SEP}{model_b}"


def downsample(maps: torch.Tensor, max_px: int) -> np.ndarray:
    """(C,H,W) -> (C,h,w) float16 with max(h, w) <= max_px, by area averaging."""
    maps = maps.detach().float()
    h, w = maps.shape[-2:]
    scale = max(h, w) / max_px
    if scale > 1:
        size = (max(1, round(h / scale)), max(1, round(w / scale)))
        maps = F.adaptive_avg_pool2d(maps[None], size)[0]
    return maps.cpu().numpy().astype(np.float16)


class PlotCapture:
    """Collects thumbnails and matrices during a run, then writes them into the results."""

    def __init__(self, n_images: int = 1) -> None:
        self.n_images = n_images
        self.thumbs: dict[str, dict[str, np.ndarray]] = {}
        self.mats: dict[str, dict[str, np.ndarray]] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def add_maps(self, item: Any, acts: dict[str, dict[str, torch.Tensor]]) -> None:
        """Keep the thumbnails of one image's captured maps (and of the input image)."""
        if len(self.thumbs) >= self.n_images or item.id in self.thumbs:
            return
        kept = {"__input__": downsample(torch.as_tensor(np.asarray(item.image)), INPUT_PX)}
        for model, layers in acts.items():
            for layer, maps in layers.items():
                kept[thumb_key(model, layer)] = downsample(maps, THUMB_PX)
        self.thumbs[item.id] = kept

    def add_matrix(self, image_id: str, sim: Any) -> None:
        """Keep one similarity matrix of a kept image (one direction per model pair)."""
        if image_id not in self.thumbs:
            return
        mats = self.mats.setdefault(image_id, {})
        key = matrix_key(sim.metric, sim.model_a, sim.model_b)
        if key in mats or matrix_key(sim.metric, sim.model_b, sim.model_a) in mats:
            return
        if sim.values.size > MAX_MATRIX_CELLS:
            return
        mats[key] = np.asarray(sim.values, dtype=np.float32)
        self.meta.setdefault(image_id, {})[key] = {
            "blocks_a": [[b.layer, b.n_maps] for b in sim.blocks_a],
            "blocks_b": [[b.layer, b.n_maps] for b in sim.blocks_b],
            "higher_is_more_similar": bool(sim.higher_is_more_similar),
        }

    def take(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What was kept since the last call, as JSON-able metadata and named arrays (for a
        block of a run); the capture is then empty again."""
        meta: dict[str, Any] = {"thumbs": [], "mats": [], "meta": self.meta}
        arrays: dict[str, np.ndarray] = {}
        for kind, kept in (("thumbs", self.thumbs), ("mats", self.mats)):
            for image, per_key in kept.items():
                names = []
                for key, array in per_key.items():
                    name = f"{kind}/{len(arrays)}"
                    arrays[name] = np.ascontiguousarray(array)
                    names.append([key, name])
                meta[kind].append([image, names])
        self.thumbs, self.mats, self.meta = {}, {}, {}
        return meta, arrays

    def absorb(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Add what :meth:`take` gave (images after those already kept, up to ``n_images``)."""
        for image, names in meta["thumbs"]:
            if len(self.thumbs) < self.n_images and image not in self.thumbs:
                self.thumbs[image] = {key: arrays[name] for key, name in names}
        for image, names in meta["mats"]:
            if image in self.thumbs:
                self.mats.setdefault(image, {}).update({key: arrays[n] for key, n in names})
                self.meta.setdefault(image, {}).update(meta["meta"].get(image, {}))

    def write(self, root: Path) -> None:
        """Write ``thumbnails/`` and ``matrices/`` under ``root``."""
        _write_folder(Path(root) / "thumbnails", self.thumbs, {})
        _write_folder(Path(root) / "matrices", self.mats, self.meta)


def _write_folder(folder: Path, per_image: dict[str, dict[str, np.ndarray]],
                  meta: dict[str, dict[str, Any]]) -> None:
    if not per_image:
        return
    index = {}
    for image, arrays in per_image.items():
        name = f"{slug(image)}.npz"
        keys = list(arrays)
        payload = {f"a{i}": arrays[k] for i, k in enumerate(keys)}
        payload["__keys__"] = np.array(json.dumps(keys))
        if image in meta:
            payload["__meta__"] = np.array(json.dumps(meta[image]))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **payload)
        atomic_write_bytes(folder / name, buffer.getvalue())
        index[image] = name
    atomic_write_bytes(folder / "index.json", (json.dumps(index, indent=2) + "\n").encode())
