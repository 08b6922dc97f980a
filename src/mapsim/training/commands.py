"""The ``train``, ``evaluate`` and ``models`` subcommands (registered by :mod:`mapsim.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mapsim.errors import SpecError


def _train_command(args: argparse.Namespace) -> list[str]:
    """The ``mapsim train`` command line of ``args`` (recorded in the card)."""
    command = ["mapsim", "train", args.spec]
    for flag in ("out", "device"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    return command + [f"--{flag}" for flag in ("resume", "overwrite", "quiet")
                      if getattr(args, flag)]


def _cmd_train(args: argparse.Namespace) -> int:
    from mapsim.training.loop import train
    from mapsim.spec.train_spec import load_train_spec

    spec = load_train_spec(args.spec)
    out = Path(args.out).absolute() if args.out else None  # --out: relative to here
    result = train(spec, base_dir=Path(args.spec).resolve().parent, out_dir=out,
                   resume=args.resume, overwrite=args.overwrite, device=args.device,
                   progress=not args.quiet, command=_train_command(args))
    m = result.best_metrics
    print(f"best epoch {result.best_epoch}/{spec.epochs}: validation IoU {m['iou']:.4f}, "
          f"clDice {m['cldice']:.4f}, Dice {m['dice']:.4f}")
    print(f"weights: {result.out_dir / 'best.safetensors'} (card: best.json); log: "
          f"{result.out_dir / 'log.csv'}")
    return 0


def _dataset_from(arg: str) -> tuple[Any, dict[str, Any], Path]:
    """DATA: a dataset file (YAML/TOML/JSON), inline YAML, or a run/training spec's data."""
    from pydantic import TypeAdapter, ValidationError

    from mapsim.registry import load_registry
    from mapsim.spec.run_spec import _choice_type, format_validation_error, parse_document, \
        read_document

    path = Path(arg)
    if path.suffix.lower() in (".yaml", ".yml", ".json", ".toml") and path.is_file():
        data, base = read_document(path), path.resolve().parent
    elif ":" in arg or "{" in arg:
        data, base = parse_document(arg, "yaml", "--data"), Path.cwd()
    else:
        raise SpecError(
            f"--data {arg!r} is neither a dataset file nor inline YAML. Give e.g. "
            "'{name: folder, images: data/images, labels: data/labels}' or "
            "'{name: synthetic-vessels, count: 5, seed: 1000}', or a .yaml file holding one."
        )
    # a run spec's images, a training spec's data; a dataset's own fields (the folder
    # dataset's `images`, say) are left alone: a dataset names itself and no model
    if "models" in data or "model" in data or "name" not in data:
        for key in ("images", "data"):
            if key in data and isinstance(data[key], (dict, str)):
                data = data[key]
                break
    registry = load_registry()
    Images = _choice_type("dataset", registry, string_field="paths")
    try:
        choice = TypeAdapter(dict[str, Images]).validate_python({"data": data})["data"]
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, "--data", {"data": data})) from None
    params = choice.model_dump(exclude={"name"})
    dataset = registry.create("dataset", choice.name, params, base_dir=base)
    return dataset, choice.model_dump(mode="json"), base


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mapsim.training.evaluate import evaluate, format_summary
    from mapsim.training.models import load_segmentation_model

    dataset, data_spec, _ = _dataset_from(args.data)
    models = [load_segmentation_model(m) for m in args.models]
    out = args.out or f"results/evaluate-{'-'.join(m.name for m in models)}"
    result = evaluate(models, dataset, out, device=args.device, amp=args.amp,
                      panels=not args.no_panels, overwrite=args.overwrite,
                      progress=not args.quiet, data_spec=data_spec)
    n = result.per_image.image.nunique()
    print(f"{len(models)} model(s) on {n} image(s); results in {result.out_dir}")
    print("mean ± std over images:")
    print(format_summary(result.summary))
    return 0


def _number(value: Any, pattern: str = "{:.3f}") -> str:
    return pattern.format(value) if isinstance(value, (int, float)) else "-"


def _cmd_models(args: argparse.Namespace) -> int:
    from mapsim.io.images import natural_key
    from mapsim.models.build import pretrained_card, pretrained_names

    if args.name:
        print(json.dumps(pretrained_card(args.name), indent=2))
        return 0
    names = sorted(pretrained_names(), key=natural_key)
    if not names:
        print("no pretrained weights are bundled with this mapsim")
        return 0
    rows = [("name", "architecture", "conv params", "best epoch", "val IoU", "val clDice",
             "held-out IoU", "held-out clDice")]
    for name in names:
        card = pretrained_card(name)
        arch = dict((card.get("model") or {}).get("architecture") or {})
        shown = f"{arch.pop('name', '?')} " + " ".join(
            f"{k}={arch[k]}" for k in ("depth", "width", "kernel_size") if k in arch)
        val = (card.get("metrics") or {}).get("validation") or {}
        held = (card.get("held_out") or {}).get("mean") or {}
        params = (card.get("parameters") or {}).get("conv_modules")
        rows.append((name, shown, _number(params, "{:,}"),
                     f"{card.get('epoch', '-')}/{card.get('epochs', '-')}",
                     _number(val.get("iou")), _number(val.get("cldice")),
                     _number(held.get("iou")), _number(held.get("cldice"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print("\nuse one as weights: pretrained:NAME; `mapsim models NAME` prints its card "
          "(training spec, command, output, held-out scores)")
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``train``, ``evaluate`` and ``models`` to the ``mapsim`` subparsers ``sub``."""
    p = sub.add_parser("train", help="train a segmentation network from a training spec")
    p.add_argument("spec", help="training spec (.yaml, .yml, .toml or .json)")
    p.add_argument("--out", help="output folder (default: the spec's output.dir, else "
                   "runs/<name> beside the spec)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the folder's last checkpoint (epochs may be raised)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a folder that holds an earlier run")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the spec's device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="score segmentation models on a labelled data set")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="pretrained:NAME, a weights file with its card (runs/x/best.safetensors),"
                   " a model spec file or inline YAML; prefix NAME= to name it")
    p.add_argument("--data", required=True,
                   help="labelled images: a dataset as inline YAML (e.g. '{name: "
                   "synthetic-vessels, count: 5, seed: 1000}') or a file holding one (or a "
                   "run or training spec: its images/data)")
    p.add_argument("--out", help="results folder (default: results/evaluate-<models>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--no-panels", action="store_true", help="do not draw the per-image panels")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results in a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("models", help="list the bundled pretrained networks (or print a card)")
    p.add_argument("name", nargs="?", help="print this network's card as JSON")
    p.set_defaults(func=_cmd_models)
