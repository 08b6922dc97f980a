"""Finding image files and pairing them with their label files.

The ``files`` and ``folder`` datasets name images and labels with files, folders or glob
patterns; :func:`find_image_files` expands them, gives every image a unique id and pairs each
image with its label by file stem (``img1.png`` with ``img1.png`` or, with
``label_suffix: _label``, ``img1_label.png``). Everything is resolved at once, so that a typo is
reported before any model runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import NamedTuple

from mapsim.errors import ImageError, closest_matches
from mapsim.io.images import expand_paths


class FileEntry(NamedTuple):
    """One image found by :func:`find_image_files`: its id, its file and its label file
    (or None)."""

    id: str
    image: Path
    label: Path | None


def _relative_keys(paths: Sequence[Path]) -> list[PurePath]:
    """Each path relative to the common parent of all of them, without its suffix."""
    parent = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.relative_to(parent).with_suffix("") for p in paths]


def image_ids(paths: Sequence[Path]) -> list[str]:
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


def find_image_files(
    paths: str | list[str],
    labels: str | list[str] | None = None,
    label_suffix: str = "",
    base_dir: Path | str = ".",
) -> list[FileEntry]:
    """The images named by ``paths`` (files, folders or glob patterns), in natural order, each
    with its id (:func:`image_ids`) and, when ``labels`` are given, its label file.

    Relative entries are resolved against ``base_dir``. Labels are paired with images by file
    stem, ignoring ``label_suffix`` at the end of label stems; files matched by both ``paths``
    and ``labels`` are labels. Where several labels share an image's stem (in different
    folders), the one at the same relative path is taken.

    :raises ImageError: for paths that do not resolve (see
        :func:`mapsim.io.images.expand_paths`), when every image is also a label, or for an
        image with no label or several, when labels are given.
    """
    base_dir = Path(base_dir)
    images = expand_paths(paths, base_dir, what="image")
    if labels is None:
        return [FileEntry(i, path, None) for i, path in zip(image_ids(images), images)]
    label_files = expand_paths(labels, base_dir, what="label")
    # A folder or pattern that matches images and labels alike: labels are not images.
    label_set = {path.resolve() for path in label_files}
    images = [path for path in images if path.resolve() not in label_set]
    if not images:
        raise ImageError(
            f"every file matched by the image paths {_describe(paths)} is also a "
            f"label (matched by {_describe(labels)}). Give the images and the labels "
            "as different files, folders or patterns."
        )
    pairs = _pair_labels(images, label_files, labels, label_suffix, base_dir)
    return [FileEntry(i, path, lab) for i, path, lab in zip(image_ids(images), images, pairs)]


def _pair_labels(images: list[Path], labels: list[Path], patterns: str | list[str],
                 suffix: str, base_dir: Path) -> list[Path]:
    """The label of each image, matched by stem (minus ``suffix``)."""
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
            f"{len(labels)} label file(s) matched by {_describe(patterns)} "
            f"(relative to {base_dir.absolute()}).{hint}"
        )
    return paired
