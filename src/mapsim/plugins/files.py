"""The ``files`` dataset: images (and optional binary labels) read from files on disk.

A spec names image files, folders or glob patterns; labels are paired with images by file stem
(``img1.png`` with ``img1.png`` or, with ``label_suffix: _label``, ``img1_label.png``). Paths are
resolved when the dataset is built, so a typo is reported before any model runs; the images
themselves are read lazily, one at a time, while iterating.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from mapsim import (
    Dataset,
    FileEntry,
    ImageError,
    ImageItem,
    find_image_files,
    hookimpl,
    normalise_image,
    read_image,
    read_label,
    to_channels,
)
from mapsim import Params as BaseParams
from mapsim import image_ids as make_ids  # noqa: F401 (this module's name for it)


class FilesDataset(Dataset):
    """Images read from files, folders or glob patterns, with optional binary labels."""

    name = "files"

    class Params(BaseParams):
        """Parameters of the ``files`` dataset.

        paths: image files, folders or glob patterns (relative to the spec's folder).
        labels: label files, folders or patterns, paired with images by file stem.
        label_suffix: an ending of label stems to ignore when pairing (e.g. ``"_label"``).
        color: how RGB images become model input channels.
        normalise: per-image intensity normalisation.
        same_size: require every image to have the same height and width.
        """

        paths: str | list[str]
        labels: str | list[str] | None = None
        label_suffix: str = ""
        color: Literal["luminance", "red", "green", "blue", "rgb"] = "luminance"
        normalise: Literal["zscore", "minmax", "none"] = "zscore"
        same_size: bool = False

    params: FilesDataset.Params

    def __init__(self, params: FilesDataset.Params, base_dir: Path | None = None) -> None:
        """Resolve the image (and label) paths now, so that errors come before any model runs.

        :raises ImageError: for paths that do not resolve, or an image without a label when
            labels are given.
        """
        super().__init__(params, base_dir)
        p = self.params
        #: every image with its id and its label file (None without labels), in natural order
        self.entries: list[FileEntry] = find_image_files(
            p.paths, p.labels, p.label_suffix, self.base_dir
        )
        self._first: tuple[Path, tuple[int, ...]] | None = None  # for same_size

    def __len__(self) -> int:
        """Number of images."""
        return len(self.entries)

    def __iter__(self) -> Iterator[ImageItem]:
        """Read, convert and normalise the images one at a time, in sorted order.

        :raises ImageError: for an unreadable file, a label whose size differs from its image,
            or (with ``same_size``) an image whose size differs from the first one.
        """
        return self.slice(0, len(self.entries))

    def slice(self, start: int, stop: int) -> Iterator[ImageItem]:
        """Images ``start`` to ``stop - 1`` of the sorted order, read one at a time (with
        ``same_size``, each is checked against the first image of the whole set)."""
        p = self.params
        for entry in self.entries[max(start, 0):stop]:
            image = to_channels(read_image(entry.image), p.color)
            shape = image.shape[1:]
            if p.same_size:
                first, first_shape = self._first_shape(entry.image, shape)
                if shape != first_shape:
                    raise ImageError(
                        f"images differ in size but same_size is set: {first} is "
                        f"{first_shape[0]}x{first_shape[1]} (height x width) and {entry.image} "
                        f"is {shape[0]}x{shape[1]}. Resize the images, or set same_size: false."
                    )
            label = None
            if entry.label is not None:
                label = read_label(entry.label)
                if label.shape != shape:
                    raise ImageError(
                        f"label {entry.label} is {label.shape[0]}x{label.shape[1]} (height x "
                        f"width) but its image {entry.image} is {shape[0]}x{shape[1]}. A label "
                        "must have the size of its image."
                    )
            yield ImageItem(
                id=entry.id,
                image=normalise_image(image, p.normalise),
                label=label,
                source=str(entry.image),
            )

    def _first_shape(self, path: Path, shape: tuple[int, ...]) -> tuple[Path, tuple[int, ...]]:
        """The first image of the set and its (height, width); read once, when ``path`` is not
        that image."""
        if self._first is None:
            first = self.entries[0].image
            self._first = (first, shape if first == path else
                           to_channels(read_image(first), self.params.color).shape[1:])
        return self._first


@hookimpl
def register_datasets(register):
    """Register the ``files`` dataset."""
    register(FilesDataset)
