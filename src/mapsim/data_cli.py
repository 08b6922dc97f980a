"""``mapsim data ...``: commands that write data sets to disk.

``mapsim data synth --count N --size H W --seed S --out DIR`` writes ``N`` synthetic vessel
images as PNG files ``DIR/<id>.png`` (the raw rendering, 16-bit by default) and their labels as
``DIR/labels/<id>.png`` (0 = background, 255 = vessel), plus ``DIR/synth.json`` with the
parameters that regenerate them. Every file is written to a temporary name and renamed, so an
interrupted run leaves no half-written file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from mapsim.errors import OutputError, SpecError
from mapsim.io.atomic import atomic_path, atomic_write_json


def atomic_write_png(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as a PNG atomically (:func:`mapsim.io.atomic.atomic_path`)."""
    from skimage import io

    with atomic_path(path, suffix=".png") as tmp:  # the suffix tells skimage the format
        io.imsave(str(tmp), array, check_contrast=False)


def to_uint(raw: np.ndarray, bits: int, full_scale: float) -> np.ndarray:
    """Quantise a raw rendering to unsigned ``bits``-bit integers: [0, full_scale] -> [0, max]."""
    top = (1 << bits) - 1
    dtype = np.uint8 if bits == 8 else np.uint16
    scaled = np.rint(np.clip(raw.astype(np.float64) / full_scale, 0.0, 1.0) * top)
    return scaled.astype(dtype)


def synth(
    out: Path, count: int, size: tuple[int, int], seed: int, start: int = 0, bits: int = 16,
    params: dict[str, Any] | None = None, progress: bool = False,
) -> list[str]:
    """Write ``count`` synthetic images and labels to ``out``; returns their ids.

    ``params``: further ``synthetic-vessels`` parameters (appearance and geometry knobs).

    :raises SpecError: for invalid parameters.
    :raises OutputError: when ``out`` cannot be written.
    """
    from pydantic import ValidationError

    from mapsim.registry import load_registry

    fields = {"count": count, "size": list(size), "seed": seed, "start": start,
              **(params or {})}
    vessels = load_registry().get("dataset", "synthetic-vessels").cls
    try:
        dataset = vessels(vessels.Params(**fields))
    except ValidationError as exc:
        known = sorted(vessels.Params.model_fields)
        raise SpecError(_format_errors(exc, known)) from None
    if bits not in (8, 16):
        raise SpecError(f"--bits must be 8 or 16, not {bits}.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"the output path {out} exists and is not a directory.")
    # the rendering's full scale: the brightest vessel centre under the brightest
    # illumination, with room for the noise
    p = dataset.params
    full_scale = (1.0 + p.illumination) * (p.background + 3 * p.texture + 1.3) * 1.25
    ids = []
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="synth", unit="image")
    try:
        for i in indices:
            sample = dataset.sample(i)
            atomic_write_png(out / f"{sample.id}.png", to_uint(sample.raw, bits, full_scale))
            atomic_write_png(out / "labels" / f"{sample.id}.png",
                             np.where(sample.label, 255, 0).astype(np.uint8))
            ids.append(sample.id)
        meta = {
            "dataset": "synthetic-vessels",
            "params": p.model_dump(mode="json"),
            "bits": bits,
            "full_scale": full_scale,
            "ids": ids,
            "note": "image PNG value v stands for the raw intensity v / (2**bits - 1) * full_scale",
        }
        atomic_write_json(out / "synth.json", meta)
    except OSError as exc:
        raise OutputError(f"cannot write the synthetic images to {out}: {exc}") from exc
    return ids


def _format_errors(exc: Any, known: list[str]) -> str:
    """One line per invalid synthetic-vessels parameter."""
    lines = ["invalid synthetic-vessels parameters:"]
    for item in exc.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "parameters"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown parameter; the parameters are {', '.join(known)}")
        else:
            given = item.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"  {where}: {item['msg']}{shown}")
    return "\n".join(lines)


def _parse_params(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each VALUE read as YAML (numbers, lists such as [4, 7])."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--param {item!r}: give KEY=VALUE, e.g. --param photons=20.")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SpecError(f"--param {item!r}: the value is not valid YAML ({exc}).") from None
    return out


def _cmd_synth(args: argparse.Namespace) -> int:
    ids = synth(Path(args.out), args.count, tuple(args.size), args.seed, start=args.start,
                bits=args.bits, params=_parse_params(args.param), progress=not args.quiet)
    print(f"wrote {len(ids)} image(s) to {args.out} and their labels to "
          f"{Path(args.out) / 'labels'} ({ids[0]} ... {ids[-1]})")
    return 0


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mapsim data`` and its subcommands on the main parser's subparsers."""
    data = sub.add_parser("data", help="write data sets (synthetic vessel images)")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = dsub.add_parser("synth", help="write synthetic vessel images and labels as PNG files")
    p.add_argument("--count", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--size", nargs=2, type=int, default=(256, 256), metavar=("H", "W"),
                   help="height and width in pixels (default 256 256)")
    p.add_argument("--seed", type=int, default=0, help="image set seed (default 0)")
    p.add_argument("--start", type=int, default=0, help="index of the first image (default 0)")
    p.add_argument("--out", required=True, help="output folder (labels go to OUT/labels)")
    p.add_argument("--bits", type=int, default=16, choices=(8, 16),
                   help="bits per image pixel (default 16)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="another synthetic-vessels parameter, e.g. photons=20 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)
