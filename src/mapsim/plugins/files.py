"""The ``files`` dataset: images (and optional binary labels) read from files on disk.

A spec names image files, folders or glob patterns; labels are paired with images by file stem
(``img1.png`` with ``img1.png`` or, with ``label_suffix: _label``, ``img1_label.png``). Paths are
resolved when the dataset is built, so a typo is reported before any model runs; the images
themselves are read lazily, one at a time, while iterating.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath
from typing import Literal, NamedTuple

from mapsim.errors import ImageError, closest_matches
from mapsim.hookspecs import hookimpl
from mapsim.io.images import expand_paths, normalise, read_image, read_label, to_channels
from mapsim.api import Dataset, ImageItem
from mapsim.api import Params as BaseParams


class FileEntry(NamedTuple):
    """One image of a :class:`FilesDataset`: its id, its file and its label file (or None)."""

    id: str
    image: Path
    label: Path | None


def _relative_keys(paths: Sequence[Path]) -> list[PurePath]:
    """Each path relative to the common parent of all of them, without its suffix."""
    parent = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.relative_to(parent).with_suffix("") for p in paths]


def make_ids(paths: Sequence[Path]) -> list[str]:
    """Unique ids for ``paths``: the file stems, or relative paths where stems repeat.

    When two files share a stem, every id becomes the path relative to the files' common
    parent, without suffix (``train/img1``); should that still repeat (``a.png`` and
    ``a.tif``), the suffix is kept.
    """
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    relative = [key.as_posix() for key in _relative_keys(paths)]
    if len(set(relative)) == len(relative):
        return relative
    parent = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.relative_to(parent).as_posix() for p in paths]


def _strip_suffix(name: str, suffix: str) -> str:
    if suffix and name.endswith(suffix) and len(name) > len(suffix):
        return name[: -len(suffix)]
    return name


def _describe(patterns: str | list[str]) -> str:
    entries = [patterns] if isinstance(patterns, str) else list(patterns)
    return ", ".join(repr(e) for e in entries)


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
        images = expand_paths(p.paths, self.base_dir, what="image")
        labels: list[Path] = []
        if p.labels is not None:
            labels = expand_paths(p.labels, self.base_dir, what="label")
            # A folder or pattern that matches images and labels alike: labels are not images.
            label_set = {path.resolve() for path in labels}
            images = [path for path in images if path.resolve() not in label_set]
            if not images:
                raise ImageError(
                    f"every file matched by the image paths {_describe(p.paths)} is also a "
                    f"label (matched by {_describe(p.labels)}). Give the images and the labels "
                    "as different files, folders or patterns."
                )
        ids = make_ids(images)
        if p.labels is None:
            self.entries = [FileEntry(i, path, None) for i, path in zip(ids, images)]
        else:
            pairs = self._pair_labels(images, labels)
            self.entries = [FileEntry(i, path, lab) for i, path, lab in zip(ids, images, pairs)]
        self._first: tuple[Path, tuple[int, ...]] | None = None  # for same_size

    def _pair_labels(self, images: list[Path], labels: list[Path]) -> list[Path]:
        """The label of each image, matched by stem (minus ``label_suffix``)."""
        suffix = self.params.label_suffix
        by_stem: dict[str, list[Path]] = {}
        for label in labels:
            by_stem.setdefault(_strip_suffix(label.stem, suffix), []).append(label)
        label_keys = {
            label: key.with_name(_strip_suffix(key.name, suffix))
            for label, key in zip(labels, _relative_keys(labels))
        }
        image_keys = dict(zip(images, _relative_keys(images)))

        paired = []
        for image in images:
            candidates = by_stem.get(image.stem, [])
            if len(candidates) > 1:  # same stem in several folders: match the relative paths
                candidates = [c for c in candidates if label_keys[c] == image_keys[image]] or (
                    candidates
                )
            if len(candidates) == 1:
                paired.append(candidates[0])
                continue
            if candidates:
                raise ImageError(
                    f"image {image} matches {len(candidates)} labels: "
                    f"{', '.join(str(c) for c in candidates)}. Keep one label per image stem, "
                    "or arrange images and labels in matching sub-folders."
                )
            wanted = f"{image.stem!r}" + (f" or {image.stem + suffix!r}" if suffix else "")
            stems = sorted({lab.stem for lab in labels})
            similar = closest_matches(image.stem + suffix, stems, 3)
            hint = f" Similar label names: {', '.join(similar)}." if similar else ""
            longer = [s for s in stems if s.startswith(image.stem) and s != image.stem]
            if longer:
                hint += f" To pair it with {longer[0]!r}, set label_suffix: "
                hint += f"{longer[0][len(image.stem):]!r}."
            raise ImageError(
                f"image {image} has no label: no file with the stem {wanted} among the "
                f"{len(labels)} label file(s) matched by {_describe(self.params.labels)} "
                f"(relative to {self.base_dir.absolute()}).{hint}"
            )
        return paired

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
                image=normalise(image, p.normalise),
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
