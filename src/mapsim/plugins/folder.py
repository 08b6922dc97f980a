"""The ``folder`` dataset: labelled images from an images folder and a labels folder.

Images and labels are paired by file stem (``img1.png`` with ``labels/img1.png``, or with
``label_suffix: _mask``, ``labels/img1_mask.tif``), exactly as the ``files`` dataset pairs
them; PNG, TIFF and JPEG are read (and ``.npy``). Labels are binarised (non-zero = vessel, or
``> threshold``), and ``split`` selects the training or validation part of a fixed-seed split
(the one ``mapsim train`` uses, :func:`split_ids`). Every image must have a label.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from mapsim import (
    Dataset,
    FileEntry,
    ImageError,
    ImageItem,
    closest_matches,
    expand_paths,
    find_image_files,
    hookimpl,
    normalise_image,
    read_image,
    split_indices,
    to_channels,
)
from mapsim import Params as BaseParams


def split_ids(
    n: int, split: str = "all", fraction: float = 0.8, seed: int = 0
) -> list[int]:
    """The indices (sorted) of ``split`` ("all", "train" or "validation") of ``n`` images.

    ``fraction`` of the images (rounded) go to the training part, the rest to validation,
    through the fixed-seed permutation of :func:`mapsim.split_indices` (the
    split ``mapsim train`` makes with ``validation_fraction = 1 - fraction``), so a folder's
    ``split: validation`` holds exactly the images a training run validates on.

    :raises SpecError: when ``n`` < 2 and a part is asked for.
    """
    if split == "all":
        return list(range(n))
    train, validation = split_indices(n, 1.0 - fraction, seed)
    return train if split == "train" else validation


def binarise(arr: np.ndarray, threshold: float | None, source: str) -> np.ndarray:
    """A label image as a boolean (H, W) mask.

    ``threshold=None``: the label must hold at most two distinct values (gray levels, or
    colours for RGB); non-zero is vessel. Otherwise vessel is ``value > threshold`` (for RGB:
    any channel).

    :raises ImageError: for a label with more than two values and no threshold.
    """
    if threshold is not None:
        high = arr > threshold
        return high.any(axis=2) if high.ndim == 3 else high
    if arr.ndim == 3:
        values = np.unique(arr.reshape(-1, arr.shape[2]), axis=0)
        shown = [tuple(int(c) if float(c).is_integer() else float(c) for c in v)
                 for v in values[:6]]
        mask = (arr != 0).any(axis=2)
    else:
        values = np.unique(arr)
        shown = [int(v) if float(v).is_integer() else float(v) for v in values[:6]]
        mask = arr != 0
    if len(values) > 2:
        listing = ", ".join(str(v) for v in shown) + (", ..." if len(values) > 6 else "")
        raise ImageError(
            f"label {source} is not binary: it has {len(values)} distinct values ({listing}). "
            "Save it with exactly two values (0 = background, any other = vessel), losslessly "
            "(PNG or TIFF, not JPEG), or set the folder dataset's 'threshold' so that values "
            "above it are vessel (e.g. threshold: 127)."
        )
    return mask


class FolderDataset(Dataset):
    """Labelled images: an images folder and a labels folder, paired by file name."""

    name = "folder"

    class Params(BaseParams):
        """Parameters of the ``folder`` dataset.

        images: the images folder (or a glob pattern), relative to the spec's folder.
        labels: the labels folder (or pattern). Labels kept beside their images need a
            pattern and a suffix: ``labels: data/*_mask.png``, ``label_suffix: _mask``.
        label_suffix: an ending of label stems to ignore when pairing (e.g. ``"_mask"``).
        threshold: vessel = label value > threshold; None: the label must be binary and
            non-zero is vessel.
        split: all images, or the training or validation part of the fixed-seed split.
        fraction: share of the images in the training part. seed: seed of the split.
        color, normalise: as for the ``files`` dataset.
        """

        images: str
        labels: str
        label_suffix: str = ""
        threshold: float | None = None
        split: Literal["all", "train", "validation"] = "all"
        fraction: float = Field(0.8, gt=0, lt=1)
        seed: int = Field(0, ge=0, lt=2**32)
        color: Literal["luminance", "red", "green", "blue", "rgb"] = "luminance"
        normalise: Literal["zscore", "minmax", "none"] = "zscore"

    params: FolderDataset.Params

    def __init__(self, params: FolderDataset.Params, base_dir: Path | None = None) -> None:
        """Find and pair the files now, so that errors come before any model runs.

        :raises ImageError: for a missing folder, a folder without images, or an image that
            has no label.
        """
        super().__init__(params, base_dir)
        p = self.params
        self._check_every_image_has_a_label()
        #: every pair of the folder, in natural order (before the split), paired by stem
        #: exactly as the ``files`` dataset pairs them
        self.all_entries: list[FileEntry] = find_image_files(
            p.images, p.labels, p.label_suffix, self.base_dir
        )
        keep = split_ids(len(self.all_entries), p.split, p.fraction, p.seed)
        #: the pairs of this split
        self.entries: list[FileEntry] = [self.all_entries[i] for i in keep]

    def _check_every_image_has_a_label(self) -> None:
        """Name every image without a label, with the labels that exist and the closest."""
        p = self.params
        images = expand_paths(p.images, self.base_dir, what="image")
        labels = expand_paths(p.labels, self.base_dir, what="label")
        label_set = {path.resolve() for path in labels}
        images = [path for path in images if path.resolve() not in label_set]
        if not images:
            return  # find_image_files explains that every image is also a label
        suffix = p.label_suffix
        stems = {lab.stem[: -len(suffix)] if suffix and lab.stem.endswith(suffix) else lab.stem
                 for lab in labels}
        missing = [im for im in images if im.stem not in stems]
        if not missing:
            return
        first = missing[0]
        names = sorted(lab.name for lab in labels)
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        wanted = first.stem + suffix
        similar = closest_matches(wanted, [lab.stem for lab in labels], 3)
        hint = f" Closest label names: {', '.join(similar)}." if similar else ""
        longer = sorted(lab.stem for lab in labels
                        if lab.stem.startswith(first.stem) and lab.stem != first.stem)
        if longer and not suffix:
            hint += (f" To pair {first.name} with {longer[0]}, set label_suffix: "
                     f"{longer[0][len(first.stem):]!r}.")
        others = f" (and {len(missing) - 1} more image(s) without a label)" if len(missing) > 1 \
            else ""
        raise ImageError(
            f"image {first} has no label{others}: no file named {wanted}.* among the labels "
            f"matched by {p.labels!r} (relative to {self.base_dir.absolute()}): {shown}.{hint} "
            "Add the missing labels, or move unlabelled images out of the images folder."
        )

    def __len__(self) -> int:
        """Number of images in this split."""
        return len(self.entries)

    def __getitem__(self, i: int) -> ImageItem:
        """The ``i``-th image of this split, normalised, with its binary label.

        :raises ImageError: for an unreadable file, a label that is not binary, or a label
            whose size differs from its image.
        """
        entry = self.entries[i]
        p = self.params
        image = to_channels(read_image(entry.image), p.color)
        label = binarise(read_image(entry.label), p.threshold, str(entry.label))
        if label.shape != image.shape[1:]:
            h, w = image.shape[1:]
            raise ImageError(
                f"label {entry.label} is {label.shape[0]}x{label.shape[1]} (height x width) but "
                f"its image {entry.image} is {h}x{w}. A label must have the size of its image: "
                "check that the files are paired correctly, or resize the label with "
                "nearest-neighbour interpolation."
            )
        return ImageItem(id=entry.id, image=normalise_image(image, p.normalise), label=label,
                         source=str(entry.image))

    def __iter__(self) -> Iterator[ImageItem]:
        """The images of this split in natural file-name order, read one at a time."""
        for i in range(len(self)):
            yield self[i]

    def slice(self, start: int, stop: int) -> Iterator[ImageItem]:
        """Images ``start`` to ``stop - 1``, read one at a time (random access)."""
        for i in range(max(start, 0), min(stop, len(self))):
            yield self[i]

    def ids(self) -> Sequence[str]:
        """The ids of the images of this split."""
        return [e.id for e in self.entries]


@hookimpl
def register_datasets(register):
    """Register the ``folder`` dataset."""
    register(FolderDataset)
