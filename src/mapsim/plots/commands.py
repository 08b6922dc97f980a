"""The ``mapsim plot`` and ``mapsim show`` commands (argument parsing stays in cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapsim.errors import MapsimError


def cmd_plot(args: argparse.Namespace) -> int:
    """Redraw plots/ (and report.html with --report) of a results directory."""
    from mapsim.plots.draw import redraw

    root = Path(args.results)
    report = args.report or (root / "report.html").exists()
    pictures = None if args.pictures is None else [
        k.strip() for k in args.pictures.split(",") if k.strip()]
    written = redraw(root, report=report, pictures=pictures)
    pictures = [p for p in written if p.suffix == ".png"]
    print(f"{len(pictures)} picture(s) in {root / 'plots'}"
          + (f"; report: {root / 'report.html'}" if report else ""))
    return 0


def _build(args: argparse.Namespace) -> tuple[str, Any, Any]:
    """(name, loaded model, extractor) from MODEL_SPEC, like `mapsim layers`; ``args.layer``
    may be one of a run spec's own layer labels (it is replaced by its module path)."""
    from mapsim.models.build import build_from_spec
    from mapsim.registry import load_registry
    from mapsim.spec.run_spec import read_model_spec

    registry = load_registry()
    name, mspec, base = read_model_spec(args.model_spec, args.model, registry=registry)
    labels = _spec_document(args.model_spec).get("layers", {}).get(name)
    if isinstance(labels, dict) and args.layer in labels:
        args.layer_label, args.layer = args.layer, labels[args.layer]
    loaded = build_from_spec(name, mspec, registry, base)
    extractor = registry.create("extractor", mspec.extractor.name,
                                mspec.extractor.model_dump(exclude={"name"}))
    loaded.module.eval()
    return name, loaded, extractor


def _spec_document(arg: str) -> dict[str, Any]:
    """MODEL_SPEC's document when it is a run spec file (else an empty mapping)."""
    from mapsim.spec.documents import run_spec_document

    return run_spec_document(arg)


def _image(args: argparse.Namespace) -> Any:
    """The image to show: IMAGE (a file), or image ``--image N`` of the run spec's images
    (default the first when MODEL_SPEC is a run spec and no IMAGE is given)."""
    from mapsim.registry import load_registry
    from mapsim.spec.run_spec import load_spec

    registry = load_registry()
    if args.image is not None and args.image_index is not None:
        raise MapsimError("give either an IMAGE file or --image N, not both")
    if args.image is not None:
        dataset = registry.create(
            "dataset", "files", {"paths": args.image, "color": args.color,
                                 "normalise": args.normalise}, base_dir=Path.cwd())
        return next(iter(dataset))
    if not _spec_document(args.model_spec):
        raise MapsimError("name an IMAGE file, or give a run spec as MODEL_SPEC to show one "
                          "of its images (--image N, default 0)")
    spec_path = Path(args.model_spec)
    spec = load_spec(spec_path, registry)
    dataset = registry.create("dataset", spec.images.name,
                              spec.images.model_dump(exclude={"name"}, exclude_unset=True),
                              base_dir=spec_path.resolve().parent)
    index = args.image_index or 0
    if not 0 <= index < len(dataset):
        raise MapsimError(f"--image {index}: the spec's images are numbered 0 to "
                          f"{len(dataset) - 1}")
    return next(iter(dataset.slice(index, index + 1)))


def _ids(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise MapsimError(
            f"--maps takes comma-separated map ids such as 0,3,7; got {text!r}") from None


def cmd_show_maps(args: argparse.Namespace) -> int:
    """Draw one layer's maps for one image."""
    import numpy as np
    import torch

    from mapsim.plots.io import save_figure, slug
    from mapsim.plots.maps import choose_maps, maps_figure

    name, loaded, extractor = _build(args)
    item = _image(args)
    if loaded.in_channels is not None and item.image.shape[0] != loaded.in_channels:
        raise MapsimError(f"image {item.id} has {item.image.shape[0]} channel(s) but model "
                          f"{name!r} expects {loaded.in_channels}; use --color rgb or luminance")
    with torch.no_grad():
        out = extractor.extract(loaded.module, [args.layer],
                                torch.from_numpy(np.ascontiguousarray(item.image))[None])
    tensor = out[args.layer]
    if tensor.dim() != 4:
        raise MapsimError(f"layer {args.layer!r} gives an output of shape {tuple(tensor.shape)}, "
                          "not maps (1, C, H, W); choose a convolutional layer")
    maps = tensor[0].float().numpy()
    chosen, caption = _ids(args.maps), ""
    if args.group:
        from mapsim.plots.groups import group_members

        folder, _, number = args.group.rpartition(":")
        if not folder or not number.isdigit():
            raise MapsimError(f"--group takes RESULTS_DIR:K (K from 1), got {args.group!r}")
        chosen, caption = group_members(folder, int(number), name, args.layer, args.group_image)
        caption = f" ({caption})"
    ids = choose_maps(maps.shape[0], chosen, args.first)
    dead = maps.reshape(maps.shape[0], -1).std(axis=1) <= args.dead_std
    fig = maps_figure(maps, ids, item.image, dead,
                      f"{name} {args.layer}: {len(ids)} of {maps.shape[0]} maps{caption}, "
                      f"image {item.id}",
                      shared_scale=args.scale == "shared")
    path = Path(args.out or f"maps-{slug(name)}-{slug(args.layer)}-{slug(item.id)}.png")
    save_figure(fig, path)
    print(f"wrote {path} ({len(ids)} maps; {int(dead[ids].sum())} dead)")
    return 0


def cmd_show_kernels(args: argparse.Namespace) -> int:
    """Draw the kernels of one convolutional layer."""
    from mapsim.plots.io import save_figure, slug
    from mapsim.plots.kernels import find_conv, kernels_figure

    name, loaded, _ = _build(args)
    modules = dict(loaded.module.named_modules())
    if args.layer not in modules:
        from mapsim.errors import LayerNotFoundError

        raise LayerNotFoundError("layer", args.layer, [m for m in modules if m],
                                 hint=f"(model {name!r})")
    path_name, conv = find_conv(modules[args.layer], args.layer)
    weight = conv.weight.detach().float().cpu().numpy()
    fig = kernels_figure(weight, args.by, f"{name} {path_name}: kernels "
                         f"{weight.shape[0]} out x {weight.shape[1]} in x "
                         f"{weight.shape[2]}x{weight.shape[3]}")
    path = Path(args.out or f"kernels-{slug(name)}-{slug(args.layer)}-by-{args.by}.png")
    save_figure(fig, path)
    print(f"wrote {path}")
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``plot`` and ``show`` on the CLI's subparsers."""
    p = sub.add_parser("plot", help="redraw the pictures (and report) of a results directory")
    p.add_argument("results", metavar="RESULTS_DIR", help="a folder written by `mapsim run`")
    p.add_argument("--report", action="store_true",
                   help="also write report.html (default: only when one exists already)")
    p.add_argument("--pictures", metavar="KINDS",
                   help="comma-separated kinds to draw: heatmaps, image-heatmaps, histograms, "
                   "matrices, groups, inter-groups, or all (default: the run spec's "
                   "output.pictures)")
    p.set_defaults(func=cmd_plot)

    show = sub.add_parser("show", help="draw a model's feature maps or kernels")
    what = show.add_subparsers(dest="what", required=True, metavar="WHAT")
    for kind in ("maps", "kernels"):
        q = what.add_parser(kind, help=("a layer's maps for one image" if kind == "maps"
                                        else "a convolutional layer's kernels"))
        q.add_argument("model_spec", metavar="MODEL_SPEC",
                       help="a run spec, a model spec file, or inline YAML (as `mapsim layers`)")
        if kind == "maps":
            q.add_argument("image", metavar="IMAGE", nargs="?",
                           help="an image file (or, with a run spec, --image N)")
            q.add_argument("--image", dest="image_index", type=int, metavar="N",
                           help="image N of the run spec's images (default 0 when no IMAGE)")
        q.add_argument("--layer", required=True,
                       help="module path (see `mapsim layers`), or a run spec's layer label")
        q.add_argument("--model", help="which model of a run spec (default: the first)")
        q.add_argument("--out", help="PNG file to write (default: a name in this folder)")
        if kind == "maps":
            q.add_argument("--maps", help="comma-separated map ids, e.g. 0,3,7")
            q.add_argument("--first", type=int, help="the first N maps (default: all, max 64)")
            q.add_argument("--group", metavar="RESULTS_DIR:K",
                           help="the maps of well-correlated group K of this layer with itself "
                           "in a results directory (numbered as in its groups-*.png)")
            q.add_argument("--group-image", help="image id for --group (default: the first)")
            q.add_argument("--scale", choices=("per-map", "shared"), default="per-map",
                           help="one colour scale for all maps, or one per map (default)")
            q.add_argument("--color", default="luminance",
                           choices=("luminance", "red", "green", "blue", "rgb"))
            q.add_argument("--normalise", default="zscore", choices=("zscore", "minmax", "none"))
            q.add_argument("--dead-std", type=float, default=1e-10,
                           help="a map whose std is <= this is marked dead")
            q.set_defaults(func=cmd_show_maps)
        else:
            q.add_argument("--by", choices=("output", "input"), default="output",
                           help="rows are output maps (default) or input channels")
            q.set_defaults(func=cmd_show_kernels)
