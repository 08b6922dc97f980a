"""Image IO and preprocessing: finding files, reading images and labels, normalising.

Everything a user can get wrong here (a missing file, an unreadable image, a label that is not
binary) raises :class:`mapsim.errors.ImageError` with a message that names the file and
says how to fix it.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import numpy as np

from mapsim.errors import ImageError

#: File suffixes mapsim reads (compared case-insensitively).
SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy")

#: Colour choices of :func:`to_channels`.
COLORS = ("luminance", "red", "green", "blue", "rgb")

#: Normalisation choices of :func:`normalise`.
NORMALISATIONS = ("zscore", "minmax", "none")

#: ITU-R BT.601 luma weights for R, G, B.
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)

_GLOB_CHARS = re.compile(r"[*?\[]")
_DIGITS = re.compile(r"(\d+)")


# --------------------------------------------------------------------------- finding files
def natural_key(path: Path | str) -> tuple:
    """Sort key that orders embedded numbers by value (``img2`` before ``img10``)."""
    text = str(path)
    parts = _DIGITS.split(text.lower())
    key = tuple(int(p) if i % 2 else p for i, p in enumerate(parts))
    return (key, text)


def _supported(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def _supported_list() -> str:
    return ", ".join(SUFFIXES)


def _expand_one(entry: str, base_dir: Path, what: str) -> list[Path]:
    """The files one entry of :func:`expand_paths` stands for."""
    text = os.path.expanduser(str(entry))
    if _GLOB_CHARS.search(text):
        if os.path.isabs(text):
            pattern = text
        else:
            pattern = os.path.join(glob.escape(str(base_dir)), text)
        matches = [Path(m) for m in glob.glob(pattern, recursive=True)]
        files = [m for m in matches if m.is_file()]
        shown = os.path.normpath(os.path.join(base_dir, text))
        if not files:
            raise ImageError(
                f"the {what} pattern {entry!r} (resolved to {shown}) matches no file. "
                "Check the pattern and the folder it is relative to."
            )
        supported = [f for f in files if _supported(f)]
        if not supported:
            raise ImageError(
                f"the {what} pattern {entry!r} (resolved to {shown}) matches {len(files)} "
                f"file(s), none with a supported suffix ({_supported_list()}). "
                "Narrow the pattern to image files, e.g. '*.png'."
            )
        return supported

    path = Path(text)
    if not path.is_absolute():
        path = base_dir / path
    if not path.exists():
        raise ImageError(
            f"the {what} path {entry!r} does not exist (resolved to {os.path.normpath(path.absolute())}). "
            "Check the spelling and the folder it is relative to."
        )
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and _supported(p)]
        if not files:
            raise ImageError(
                f"the {what} folder {os.path.normpath(path.absolute())} contains no file with a supported suffix "
                f"({_supported_list()}). Put the {what}s directly in that folder, or give a "
                "recursive pattern such as 'folder/**/*.png'."
            )
        return files
    if not _supported(path):
        raise ImageError(
            f"the {what} file {os.path.normpath(path.absolute())} has the unsupported suffix {path.suffix!r}. "
            f"Supported suffixes: {_supported_list()}. Convert the file to one of them."
        )
    return [path]


def expand_paths(patterns: str | list[str], base_dir: Path, what: str = "image") -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of supported files.

    Each entry of ``patterns`` is a file, a folder (every supported file directly inside it)
    or a glob pattern (``*``, ``?``, ``[...]``, ``**`` for any depth); relative entries are
    resolved against ``base_dir``. The result holds absolute paths, de-duplicated and sorted
    naturally (``img2`` before ``img10``). ``what`` ("image", "label") names the files in
    error messages.

    :raises ImageError: for a missing path, a pattern that matches nothing, a folder without
        supported files, or a file with an unsupported suffix.
    """
    entries = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    if not entries:
        raise ImageError(f"no {what} paths were given. Name at least one file, folder or pattern.")
    base_dir = Path(base_dir).absolute()
    unique: dict[Path, Path] = {}  # real path (symlinks resolved) -> path as given
    for entry in entries:
        for path in _expand_one(entry, base_dir, what):
            unique.setdefault(path.resolve(), Path(os.path.normpath(path)))
    return sorted(unique.values(), key=natural_key)


# --------------------------------------------------------------------------- reading
def _load(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise ValueError("not a NumPy .npy file (it lacks the .npy header)")
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc):
                raise ValueError(
                    "it holds Python objects, which are not loaded for safety; save a numeric "
                    "array with numpy.save"
                ) from exc
            raise
    if suffix in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    from skimage import io

    return io.imread(path)


def read_image(path: Path | str) -> np.ndarray:
    """Read an image file as a (H, W) or (H, W, 3) array in its stored dtype.

    PNG and JPEG are read with ``skimage.io.imread``, TIFF with ``tifffile`` and ``.npy``
    with ``np.load(allow_pickle=False)``. A single-channel (H, W, 1) image is returned as
    (H, W); an alpha channel (H, W, 4) is dropped.

    :raises ImageError: when the file cannot be read, has an unsupported suffix, is not
        2-D or 3-D with 1, 3 or 4 channels last, is not numeric, or holds NaN or infinity.
    """
    path = Path(path)
    if not _supported(path):
        raise ImageError(
            f"cannot read {path}: unsupported suffix {path.suffix!r}. "
            f"Supported suffixes: {_supported_list()}."
        )
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ImageError(f"cannot read {path}: the file {what}.")
    try:
        arr = np.asarray(_load(path))
    except Exception as exc:  # every reader failure becomes one clear message
        lines = str(exc).strip().splitlines()
        reason = lines[0].rstrip(".") if lines else type(exc).__name__
        if "could not find a backend" in reason.lower():  # imageio's words for "not an image"
            reason = "its contents are not an image that any reader can decode"
        raise ImageError(
            f"cannot read {path}: {reason}. Check that the file is a valid "
            f"{path.suffix.lstrip('.').upper()} image (re-export it if it is damaged)."
        ) from exc

    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageError(
            f"cannot use {path}: its pixels have the type {arr.dtype}; "
            "images must hold integer or real numbers."
        )
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if not shape_ok or arr.size == 0:
        raise ImageError(
            f"cannot use {path}: it has the shape {arr.shape}; expected (height, width) or "
            "(height, width, channels) with 1, 3 or 4 channels last. Save a single 2-D image "
            "(not a stack, not channels-first)."
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ImageError(
            f"cannot use {path}: it contains NaN or infinite values. Replace them with finite "
            "numbers."
        )
    return arr


# --------------------------------------------------------------------------- preprocessing
def to_channels(arr: np.ndarray, color: str) -> np.ndarray:
    """Convert a (H, W) or (H, W, C) image to a float32 (channels, H, W) array.

    ``color``: ``"luminance"`` (BT.601 weights 0.299, 0.587, 0.114 for RGB; a gray image stays
    as it is), ``"red"``, ``"green"``, ``"blue"`` (that channel of an RGB image; a gray image
    is used as it is) give one channel; ``"rgb"`` gives three (a gray image is repeated).
    Integer values are converted without rescaling. A fourth (alpha) channel is ignored.

    :raises ImageError: for an unknown ``color`` or an unsupported shape.
    """
    if color not in COLORS:
        raise ImageError(f"unknown color {color!r}; choose one of {', '.join(COLORS)}.")
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim == 2:
        gray = arr.astype(np.float32)[np.newaxis]
        return np.repeat(gray, 3, axis=0) if color == "rgb" else gray
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(
            f"cannot convert an image of shape {arr.shape} to channels; expected (height, "
            "width) or (height, width, 3)."
        )
    if color == "luminance":
        lum = np.tensordot(arr.astype(np.float64), np.asarray(LUMINANCE_WEIGHTS), axes=([2], [0]))
        return lum.astype(np.float32)[np.newaxis]
    if color == "rgb":
        return np.ascontiguousarray(np.moveaxis(arr, 2, 0), dtype=np.float32)
    index = ("red", "green", "blue").index(color)
    return np.ascontiguousarray(arr[np.newaxis, :, :, index], dtype=np.float32)


#: elements per float64 temporary in :func:`normalise` (2 MiB): a large image needs no
#: full-size float64 copies, which would add to a run's peak memory while images are read ahead
_BLOCK = 1 << 18


def normalise(x: np.ndarray, method: str) -> np.ndarray:
    """Normalise one image's intensities; returns float32 of the same shape.

    ``"zscore"``: subtract the mean and divide by the standard deviation, both taken over all
    pixels and channels (per image); ``"minmax"``: scale to [0, 1]; ``"none"``: unchanged.
    Statistics and arithmetic are in float64, a block of pixels at a time. A constant image
    gives all zeros (never NaN) for ``"zscore"`` and ``"minmax"``.

    :raises ImageError: for an unknown ``method``.
    """
    if method not in NORMALISATIONS:
        raise ImageError(
            f"unknown normalisation {method!r}; choose one of {', '.join(NORMALISATIONS)}."
        )
    x = np.asarray(x)
    flat = x.reshape(-1)
    out = np.empty(x.shape, dtype=np.float32)
    out_flat = out.reshape(-1)
    blocks = [slice(k, k + _BLOCK) for k in range(0, flat.size, _BLOCK)]
    if method == "none":
        for b in blocks:
            out_flat[b] = flat[b].astype(np.float64)
        return out
    lo, hi = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 0.0)
    if hi == lo:
        out.fill(0.0)
        return out
    if method == "minmax":
        shift, scale = lo, hi - lo
    else:
        shift = sum(float(np.add.reduce(flat[b], dtype=np.float64)) for b in blocks) / flat.size
        squares = sum(float(np.add.reduce((flat[b].astype(np.float64) - shift) ** 2))
                      for b in blocks)
        scale = np.sqrt(squares / flat.size)
    for b in blocks:
        out_flat[b] = (flat[b].astype(np.float64) - shift) / scale
    return out


# --------------------------------------------------------------------------- labels and ROI
def read_label(path: Path | str) -> np.ndarray:
    """Read a label image as a boolean (H, W) mask: True where the label is non-zero.

    Gray or RGB labels are accepted (an RGB pixel is True where any channel is non-zero).
    Labels must be binary: at most two distinct values (pixel colours for RGB).

    :raises ImageError: when the file cannot be read or has more than two distinct values.
    """
    arr = read_image(path)
    if arr.ndim == 3:
        distinct = len(np.unique(arr.reshape(-1, arr.shape[2]), axis=0))
        mask = (arr != 0).any(axis=2)
    else:
        distinct = len(np.unique(arr))
        mask = arr != 0
    if distinct > 2:
        raise ImageError(
            f"label {path} has {distinct} distinct values; labels must be binary "
            "(0 = background, non-zero = vessel). Save it losslessly (PNG or TIFF, not JPEG) "
            "with exactly two values."
        )
    return mask


def roi_mask(label: np.ndarray, dilate: int = 0, *, source: str = "") -> np.ndarray:
    """The region of interest: ``label`` dilated by ``dilate`` pixels with a disk.

    ``dilate=0`` returns the label as a boolean mask; ``dilate=r`` grows it by a disk of
    radius ``r`` (``skimage.morphology.disk``). ``source`` names the label in messages.

    :raises ImageError: for a negative ``dilate`` or a mask with no pixels.
    """
    from skimage.morphology import dilation, disk

    where = f" of {source}" if source else ""
    if int(dilate) != dilate or dilate < 0:
        raise ImageError(f"the ROI dilation{where} must be a whole number >= 0, not {dilate!r}.")
    mask = np.asarray(label, dtype=bool)
    if dilate > 0:
        mask = dilation(mask, disk(int(dilate))).astype(bool)
    if not mask.any():
        raise ImageError(
            f"the ROI{where} has no pixels: the label is empty (all background). Use a label "
            "that marks at least one pixel, or do not restrict this image to its ROI."
        )
    return mask
