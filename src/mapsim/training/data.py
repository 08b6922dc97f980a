"""Labelled images for training: loading, the fixed-seed split, and each epoch's batches.

All the randomness of an epoch (the order of the images, the crop positions, the flips and
rotations) comes from a generator seeded with ``(seed, epoch)``, so an epoch is the same
whether the run went through without a break or was resumed from the previous epoch's
checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mapsim.errors import ImageError, SpecError
from mapsim.io.images import normalise
from mapsim.io.splits import split_indices  # noqa: F401 (moved to io; old imports keep working)
from mapsim.api import Dataset


@dataclass
class Sample:
    """One labelled image in memory: ``image`` float32 (C, H, W), ``label`` bool (H, W)."""

    id: str
    image: np.ndarray
    label: np.ndarray


def load_samples(dataset: Dataset, normalisation: str, what: str = "data") -> list[Sample]:
    """Read every image of ``dataset`` with its label, normalised per image.

    :raises ImageError: an image has no label, or its label's size differs from the image's.
    """
    samples = []
    for item in dataset:
        if item.label is None:
            raise ImageError(
                f"{what}: image {item.id!r} ({item.source or 'no file'}) has no label. Training "
                "and evaluation need a binary label for every image: give the data set its "
                "labels (e.g. the folder dataset's label folder)."
            )
        image = np.asarray(item.image, dtype=np.float32)
        if image.ndim == 2:
            image = image[np.newaxis]
        label = np.asarray(item.label, dtype=bool)
        if label.shape != image.shape[1:]:
            raise ImageError(
                f"{what}: the label of image {item.id!r} is {label.shape[0]}x{label.shape[1]} "
                f"but the image is {image.shape[1]}x{image.shape[2]} (height x width)."
            )
        samples.append(Sample(item.id, normalise(image, normalisation), label))
    if not samples:
        raise ImageError(f"{what}: the data set has no images.")
    return samples


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed for ``epoch`` of a run seeded with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


@dataclass(frozen=True)
class Draw:
    """Where one training example comes from: sample index, crop corner, flips, rotation."""

    index: int
    top: int
    left: int
    flip_h: bool
    flip_v: bool
    rot90: int


class TrainingBatches:
    """The batches of each epoch, drawn from the training samples."""

    def __init__(self, samples: list[Sample], batch_size: int, crop: tuple[int, int] | None,
                 flips: bool, rot90: bool, seed: int) -> None:
        """Check that the samples can be batched as asked.

        :raises SpecError: a crop larger than an image, or images of different sizes batched
            without a crop.
        """
        self.samples = samples
        self.batch_size = batch_size
        self.crop = tuple(crop) if crop is not None else None
        self.flips = flips
        self.seed = seed
        sizes = {s.image.shape[1:] for s in samples}
        if self.crop is not None:
            for s in samples:
                h, w = s.image.shape[1:]
                if self.crop[0] > h or self.crop[1] > w:
                    raise SpecError(
                        f"crop: {self.crop[0]}x{self.crop[1]} is larger than image {s.id!r} "
                        f"({h}x{w}, height x width). Use a smaller crop."
                    )
            square = self.crop[0] == self.crop[1]
        else:
            if len(sizes) > 1 and batch_size > 1:
                shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4])
                raise SpecError(
                    f"batch_size: the training images differ in size ({shown}) and cannot be "
                    "batched whole. Set a 'crop' size, or batch_size: 1."
                )
            square = all(h == w for h, w in sizes)
        # a quarter turn of a non-square crop would change its shape: only half turns then
        self.rotations = (4 if square else 2) if rot90 else 1

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.samples) // self.batch_size)

    def draws(self, epoch: int) -> list[Draw]:
        """Every example of ``epoch``, in order (a pure function of the seed and epoch)."""
        rng = np.random.RandomState(epoch_seed(self.seed, epoch))
        draws = []
        for index in rng.permutation(len(self.samples)):
            h, w = self.samples[index].image.shape[1:]
            top = left = 0
            if self.crop is not None:
                top = int(rng.randint(0, h - self.crop[0] + 1))
                left = int(rng.randint(0, w - self.crop[1] + 1))
            flip_h = flip_v = False
            if self.flips:
                flip_h, flip_v = bool(rng.randint(2)), bool(rng.randint(2))
            turns = int(rng.randint(self.rotations)) * (4 // self.rotations)
            draws.append(Draw(int(index), top, left, flip_h, flip_v, turns))
        return draws

    def example(self, draw: Draw) -> tuple[np.ndarray, np.ndarray]:
        """The (image, label) arrays of one draw."""
        sample = self.samples[draw.index]
        image, label = sample.image, sample.label
        if self.crop is not None:
            rows = slice(draw.top, draw.top + self.crop[0])
            cols = slice(draw.left, draw.left + self.crop[1])
            image, label = image[:, rows, cols], label[rows, cols]
        if draw.flip_h:
            image, label = image[:, :, ::-1], label[:, ::-1]
        if draw.flip_v:
            image, label = image[:, ::-1, :], label[::-1, :]
        if draw.rot90:
            image = np.rot90(image, draw.rot90, axes=(1, 2))
            label = np.rot90(label, draw.rot90)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The (images (N, C, H, W) float32, labels (N, H, W) int64) batches of ``epoch``,
        from batch number ``start``."""
        draws = self.draws(epoch)
        for b in range(start, len(self)):
            chunk = draws[b * self.batch_size:(b + 1) * self.batch_size]
            pairs = [self.example(d) for d in chunk]
            images = np.stack([p[0] for p in pairs])
            labels = np.stack([p[1] for p in pairs]).astype(np.int64)
            yield images, labels
