"""``cka`` with ``samples: images``: minibatch CKA over images (see :mod:`.cka`).

``CKA.create`` builds it; the bookkeeping of batches across a run's blocks is its own job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import math

import numpy as np
import torch
import torch.nn.functional as F

from mapsim import (
    ImagesMetric,
    MapsimError,
    PValued,
    ShapeMismatchError,
    SpecError,
    Undefined,
)
from mapsim.plugins.metrics import hsic
from mapsim.plugins.metrics._cka_common import CKAParams, _CKAFamily

KEY_SEP = "\x1f"


def batch_bounds(place: int, n_images: int, batch_size: int) -> tuple[int, int] | None:
    """The images ``[lo, hi)`` of the minibatch that holds image ``place`` of ``n_images``:
    consecutive batches of ``batch_size``, the last one taking a remainder of fewer than 4
    images (so every batch has at least 4); None when there are fewer than 4 images."""
    n_batches = n_images // batch_size + (1 if n_images % batch_size >= 4 else 0)
    if n_batches == 0:
        return None
    k = min(place // batch_size, n_batches - 1)
    lo = k * batch_size
    return lo, (n_images if k == n_batches - 1 else lo + batch_size)


def batch_permutations(seed: int, batch: int, n: int, count: int) -> np.ndarray:
    """The ``count`` permutations (count, n) of the ``n`` images of batch number ``batch``
    (images ``[batch B, ...)``): drawn by numpy's default generator seeded with
    ``[seed, batch]``, row r being ``Generator.permuted`` of 0..n-1 along the row, so they
    depend on the seed and the batch's place in the run only (never on blocks or processes)."""
    rng = np.random.default_rng([seed, batch])
    return rng.permuted(np.tile(np.arange(n, dtype=np.int64), (count, 1)), axis=1)


class CKAImages(_CKAFamily, ImagesMetric):
    """Minibatch CKA with images as samples: one value per layer pair over all images.

    Each image's features (per captured layer, keys ``model<US>layer``) stay where its maps
    are (the GPU in a GPU run) until its batch is complete; the batch's centred Gram matrices
    are then computed there, in chunks of features (:func:`hsic.batch_gram`), and only the
    (L, L) unbiased HSIC of the batch, times its number of images, is kept. Memory is one
    batch of features (at most ``batch_size`` + 4 images), whatever the number of images.

    The batches are images ``[k B, (k+1) B)`` of the run, in image order, the last one taking
    a remainder of fewer than 4 images (:func:`batch_bounds`). In a run the runner says where
    each block starts (:meth:`start_block`); a batch cut by a block's end is handed over in
    the block's state as its images' features (``edges``) and completed when the blocks are
    merged in image order, so the values do not depend on where the blocks were cut, nor on
    the number of processes. Without :meth:`start_block` (e.g. update() called directly) the
    images are numbered from 0 and a batch is complete once 4 more images have come (or at
    :meth:`compute`), which forms the same batches.

    Declared state (merged by blocks, ``--resume`` and torchrun): ``hsic`` (sum of the
    batches' weighted HSIC matrices), ``weight`` (images in them), ``images`` (images taken
    in), ``zero_bandwidth`` (per layer, batches with a zero RBF bandwidth), ``permuted``
    (with ``permutations`` R > 0: (R, L, L), the weighted HSIC sums with the images of each
    batch permuted by :func:`batch_permutations`), ``edges`` and
    ``edge_index`` (features and places of images whose batch a block end cut) and ``firsts``
    (per block, each layer's first features, or an empty array where the layer varied in the
    block: a layer that never varies over all images is undefined).
    """

    def __init__(self, params: CKAParams | None = None) -> None:
        super().__init__(params)
        self._settle()
        for name in ("hsic", "weight", "images", "zero_bandwidth", "permuted"):
            self.add_state(name, "sum")
        for name in ("edges", "edge_index", "firsts"):
            self.add_state(name, "cat")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._keys: list[str] = []
        #: (place in the run, features per layer) of the images of the batch being filled
        self._buffer: list[tuple[int, list[torch.Tensor]]] = []
        self._next = 0  # the place of the next image given to update()
        self._n: int | None = None  # the run's number of images, once the runner said it
        self._first: list[torch.Tensor] | None = None  # this block's first features
        #: per layer, whether its features differ from the first ones: a flag on the features'
        #: device, read once per block (no wait for the device per image)
        self._varies: list[torch.Tensor] = []
        self._pending: dict[int, list[torch.Tensor]] = {}  # merged edges, by place
        self._merged_first: list[torch.Tensor | None] = []
        self._merged_varies: list[bool] = []
        self._done = False
        self._n_images = 0  # all images, once compute() has settled the batches

    # ------------------------------------------------------------------ taking images in
    def start_block(self, start: int, n_images: int) -> None:
        """The next images are images ``start``, ``start + 1``, ... of ``n_images``."""
        if self._buffer and start != self._next:
            self._spill(self._buffer)
            self._buffer = []
        self._next, self._n = start, n_images

    def update(self, image_id: str, maps: Mapping[str, Mapping[str, torch.Tensor]],
               mask: torch.Tensor | None = None) -> None:
        """Take one image's features (one per layer) into the current batch; a full batch's
        HSIC terms are computed at once, where the maps are."""
        if mask is not None:
            raise SpecError(
                "cka with samples: images compares whole maps across images and cannot be "
                "combined with engine.roi; use samples: pixels, or remove engine.roi"
            )
        if self._done:
            raise MapsimError("cka: images were added after finish(); start a new metric")
        entry = {f"{model}{KEY_SEP}{layer}": self._pooled(layer_maps, image_id, model, layer)
                 for model, layers in maps.items() for layer, layer_maps in layers.items()}
        self._check_keys(list(entry), f"image {image_id}")
        features = list(entry.values())
        if self._first is None:
            self._first = list(features)
            self._varies = [torch.zeros((), dtype=torch.bool, device=f.device) for f in features]
        else:
            for index, vector in enumerate(features):
                self._varies[index] |= torch.ne(vector, self._first[index]).any()
        self.images = self.images + 1.0
        place, self._next = self._next, self._next + 1
        self._buffer.append((place, features))
        self._advance(place)

    def _advance(self, latest: int) -> None:
        """Compute (or hand over, when their first images are in another block) the batches
        at the front of the buffer that are settled once image ``latest`` is in."""
        size = self.params.batch_size
        while self._buffer:
            place = self._buffer[0][0]
            if self._n is not None:
                bounds = batch_bounds(place, self._n, size)
            else:  # not the last batch once 4 images beyond it have come
                k = place // size
                bounds = (k * size, (k + 1) * size) if latest >= (k + 1) * size + 3 else None
            if bounds is None or latest < bounds[1] - 1:
                return
            lo, hi = bounds
            count = sum(1 for p, _ in self._buffer if p < hi)
            part, self._buffer = self._buffer[:count], self._buffer[count:]
            if part[0][0] == lo and len(part) == hi - lo:
                self._add_batch([features for _, features in part], lo)
            else:
                self._spill(part)

    def _spill(self, part: list[tuple[int, list[torch.Tensor]]]) -> None:
        """Hand images of an incomplete batch over in the block's state."""
        for place, features in part:
            self.edges.append(dict(zip(self._keys, features)))
            self.edge_index.append(np.array(place, dtype=np.int64))

    def block_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The block's HSIC sums, the features of images whose batch it cut, and each layer's
        first features (empty where the layer varied); the states then start afresh."""
        if self._buffer:
            self._spill(self._buffer)
            self._buffer = []
        if self._first is not None:
            self.firsts.append({k: (v.new_zeros(0) if bool(varied) else v) for k, v, varied
                                in zip(self._keys, self._first, self._varies)})
        self._first, self._varies = None, []
        return super().block_state()

    # ------------------------------------------------------------------ merging, results
    def merge(self, states: Mapping[str, Any]) -> None:
        """Take in a block's states (blocks in image order): sums added, edges kept until
        their batch is complete."""
        for entry in states.get("firsts", ()):
            self._check_keys(list(entry), "a block")
            self._merge_first([torch.as_tensor(entry[k]) for k in self._keys])
        for place, entry in zip(states.get("edge_index", ()), states.get("edges", ())):
            self._check_keys(list(entry), "a block")
            self._pending[int(place)] = [torch.as_tensor(entry[k]) for k in self._keys]
        super().merge({k: v for k, v in states.items()
                       if k not in ("firsts", "edge_index", "edges")})
        if self._n is not None:
            self._settle_pending(self._n, final=False)

    def _merge_first(self, firsts: list[torch.Tensor | None]) -> None:
        if not self._merged_first:
            self._merged_first = [None] * len(firsts)
            self._merged_varies = [False] * len(firsts)
        for index, vector in enumerate(firsts):
            known = self._merged_first[index]
            if vector is None or vector.numel() == 0:
                self._merged_varies[index] = True
            elif known is None:
                self._merged_first[index] = vector
            elif not self._merged_varies[index] and not torch.equal(
                    vector.to(known.device), known):
                self._merged_varies[index] = True

    def _settle_pending(self, n_images: int, final: bool) -> None:
        """Add the batches whose images are all among the merged edges."""
        batches: dict[tuple[int, int], list[int]] = {}
        for place in sorted(self._pending):
            bounds = batch_bounds(place, n_images, self.params.batch_size)
            if bounds is not None:
                batches.setdefault(bounds, []).append(place)
        for (lo, hi), places in batches.items():
            if len(places) == hi - lo:
                self._add_batch([self._pending.pop(p) for p in places], lo)
            elif final:
                missing = sorted(set(range(lo, hi)) - set(places))
                raise MapsimError(
                    f"cka: the batch of images {lo} to {hi - 1} lacks images {missing}; "
                    "merge the states of all blocks in image order before compute()")

    def compute(self, model_a: str, model_b: str) -> dict[tuple[str, str], Any]:
        """CKA of every layer pair of two models from the HSIC sums of all batches; with
        ``permutations`` R > 0 each value is a :class:`~mapsim.types.PValued` whose ``p`` is
        (1 + #{r: CKA_r >= CKA}) / (1 + R), CKA_r the CKA with the images of every batch
        permuted by permutation r of the batch."""
        if not self._done:
            self._done = True
            n_images = round(float(np.sum(self.images)))  # 0-d or (1,) when stored
            for place, features in self._buffer:
                self._pending[place] = features
            self._buffer = []
            if self._first is not None:
                self._merge_first([None if bool(v) else f
                                   for f, v in zip(self._first, self._varies)])
                self._first = None
            if n_images >= 4:
                self._settle_pending(n_images, final=True)
            self._n_images = n_images
        keys = [tuple(k.split(KEY_SEP, 1)) for k in self._keys]
        layers_a = [i for i, k in enumerate(keys) if k[0] == model_a]
        layers_b = [i for i, k in enumerate(keys) if k[0] == model_b]
        zero_bandwidth = np.broadcast_to(np.asarray(self.zero_bandwidth), (len(keys),))
        reasons = [hsic.ZERO_BANDWIDTH if zero > 0 else (None if varies else hsic.ZERO_VARIANCE)
                   for zero, varies in zip(zero_bandwidth, self._merged_varies)]
        out: dict[tuple[str, str], Any] = {}
        if self._n_images >= 4:
            estimate = torch.from_numpy(np.asarray(self.hsic) / float(np.sum(self.weight)))
        for a in layers_a:
            for b in layers_b:
                key = (keys[a][1], keys[b][1])
                if self._n_images < 4:
                    out[key] = Undefined(hsic.TOO_FEW.format(n=self._n_images))
                else:
                    out[key] = self._tested(hsic.cka_value(estimate, a, b, reasons, True),
                                            estimate, a, b)
        return out

    def _tested(self, value: Any, estimate: torch.Tensor, a: int, b: int) -> Any:
        """``value`` with its permutation p-value (a defined value, permutations on)."""
        if isinstance(value, Undefined) or self.params.permutations == 0:
            return value
        scale = math.sqrt(float(estimate[a, a]) * float(estimate[b, b]))
        weight = float(np.sum(self.weight))
        permuted = np.asarray(self.permuted)[:, a, b] / weight / scale
        observed = float(estimate[a, b]) / scale
        return PValued(value, (1.0 + np.count_nonzero(permuted >= observed))
                      / (1.0 + self.params.permutations))

    # ------------------------------------------------------------------ features, batches
    def _check_keys(self, keys: list[str], where: str) -> None:
        if not self._keys:
            self._keys = keys
        elif keys != self._keys:
            raise MapsimError(f"{where} gave other layers than the images before it")

    def _pooled(self, maps: torch.Tensor, image_id: str, model: str,
                layer: str) -> torch.Tensor:
        """One layer's feature vector of one image, where the maps are (float32)."""
        if maps.dim() != 3:
            raise ShapeMismatchError(
                f"layer {layer!r} of model {model!r} gives maps of shape {tuple(maps.shape)}; "
                "cka expects (channels, height, width)"
            )
        maps = maps.detach().to(torch.float32)
        size = self.params.size
        if self.params.pool == "avg":
            maps = F.adaptive_avg_pool2d(maps[None], size)[0]
        elif self.params.pool == "max":
            maps = F.adaptive_max_pool2d(maps[None], size)[0]
        shape = tuple(maps.shape)
        key = f"{model}{KEY_SEP}{layer}"
        if self._shapes.setdefault(key, shape) != shape:
            raise ShapeMismatchError(
                f"cka with samples: images and pool: none needs maps of one size across "
                f"images, but layer {layer!r} of model {model!r} is {self._shapes[key]} "
                f"before image {image_id} and {shape} in it; use pool: avg or max"
            )
        if not maps.is_contiguous() and maps.permute(1, 2, 0).is_contiguous():
            # channels-last maps (the GPU's layout): the same features in pixel-major order,
            # with no copy; every image of a run has the same layout, so the order is shared
            return maps.permute(1, 2, 0).reshape(-1)
        return maps.reshape(-1)

    def _add_batch(self, batch: list[list[torch.Tensor]], lo: int) -> None:
        """Add the unbiased HSIC of every layer pair over one batch of images (its first
        image: ``lo``), and with the images permuted, computed on the device of the batch's
        features."""
        device = next((f.device for image in batch for f in image if f.device.type != "cpu"),
                      torch.device("cpu"))
        grams = []
        zero_bandwidth = np.zeros(len(self._keys))
        for index in range(len(self._keys)):
            gram, constant = hsic.batch_gram([image[index].to(device) for image in batch])
            if constant:  # a layer constant within a batch adds 0 there, exactly
                gram.zero_()
            elif self.params.kernel == "rbf":
                kernel = hsic.rbf_from_gram(gram, self.params.bandwidth, self.params.median)
                # a zero bandwidth leaves the kernel, so the layer's values, undefined
                if kernel is None:
                    zero_bandwidth[index] = 1.0
                    gram.zero_()
                else:
                    gram = kernel
            grams.append(gram)
        stacked = torch.stack(grams)
        estimate = hsic.hsic_unbiased(stacked) * len(batch)
        self.hsic = self.hsic + estimate.cpu().numpy()
        if self.params.permutations > 0:
            perms = batch_permutations(self.params.seed, lo // self.params.batch_size,
                                       len(batch), self.params.permutations)
            permuted = hsic.hsic_unbiased_permuted(stacked, torch.from_numpy(perms))
            self.permuted = self.permuted + (permuted * len(batch)).cpu().numpy()
        self.weight = self.weight + float(len(batch))
        self.zero_bandwidth = self.zero_bandwidth + zero_bandwidth
