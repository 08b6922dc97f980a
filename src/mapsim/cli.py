"""The ``mapsim`` command line: parses arguments, calls the API, prints. Nothing else."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from mapsim.errors import MapsimError


def _cmd_run(args: argparse.Namespace) -> int:
    from mapsim.runner.distributed import World
    from mapsim.session import run

    res = run(
        Path(args.spec),
        args.out,
        device=args.device,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.quiet,
    )
    if not World.from_env().main:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    from mapsim.run_summary import files_list, findings_table, timings_line

    timings = timings_line(res.info)
    print(f"{res.n_images} image(s) on {res.info['device']}"
          + (f" ({timings})" if timings else "") + f"; results in {res.dir}:")
    print(files_list(res.dir))
    findings = findings_table(res.dir)
    if findings:
        print(findings)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from mapsim.spec.prune_spec import spec_kind
    from mapsim.spec.run_spec import load_spec

    if (args.kind or spec_kind(args.spec)) == "prune":
        from mapsim.pruning.commands import validate_prune

        return validate_prune(args.spec, args.deep)
    spec = load_spec(args.spec)
    deep = ""
    if args.deep:
        from mapsim.runner.run import Runner

        base = Path(args.spec).resolve().parent
        runner = Runner(spec, base, device="cpu")
        dataset = runner.check(base)
        layers = sum(len(m.layers) for m in runner.setup.models.values())
        deep = (f"; models built, {layers} layer(s) resolved, {len(dataset)} image(s) found "
                "(the first one read and checked)")
    print(
        f"{args.spec} is valid: {len(spec.models)} model(s), "
        f"{len(spec.pairs())} comparison(s), metrics: "
        + ", ".join(m.label or m.name for m in spec.metrics) + deep
    )
    if not args.deep:
        print("(fields only: add --deep to also build the models, resolve the layers and find "
              "the images)")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from mapsim.spec.prune_spec import prune_json_schema
    from mapsim.spec.run_spec import json_schema

    schema = prune_json_schema() if args.kind == "prune" else json_schema()
    text = json.dumps(schema, indent=2) + "\n"
    if args.out:
        from mapsim.runner.writer import atomic_write_text

        atomic_write_text(Path(args.out), text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from mapsim.registry import load_registry

    rows = [(e.kind, e.name, f"{e.provider.distribution} {e.provider.version}",
             e.provider.entry_point) for e in load_registry().entries()]
    header = ("kind", "name", "provided by", "entry point")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from mapsim.models.layers import describe_layers, format_layers
    from mapsim.models.build import build_from_spec
    from mapsim.registry import load_registry
    from mapsim.spec.documents import run_spec_document
    from mapsim.spec.run_spec import read_model_spec

    registry = load_registry()
    name, mspec, base = read_model_spec(args.model_spec, args.model, registry=registry)
    loaded = build_from_spec(name, mspec, registry, base)
    extractor = registry.create("extractor", mspec.extractor.name,
                                mspec.extractor.model_dump(exclude={"name"}))
    channels = loaded.in_channels or 1
    height, width = args.input_size
    infos = describe_layers(loaded.module, extractor, (channels, height, width))
    print(f"model {name!r}, input 1 x {channels} x {height} x {width}")
    labels = run_spec_document(args.model_spec).get("layers", {}).get(name)
    if isinstance(labels, dict) and labels:
        print("labels in the spec (usable wherever a layer is named): "
              + ", ".join(f"{label} = {path}" for label, path in labels.items()))
    print(format_layers(infos))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mapsim`` command."""
    from mapsim._version import __version__

    parser = argparse.ArgumentParser(
        prog="mapsim",
        description="Extract, compare and summarise the activation maps of CNNs.",
    )
    parser.add_argument("--version", action="version", version=f"mapsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a spec and write its results directory")
    p.add_argument("spec", help="run spec (.yaml, .yml, .toml or .json)")
    p.add_argument("--out", help="results directory (default: the spec's output.dir)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the spec's device)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results in a non-empty output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same spec: skip the blocks of "
                   "images it finished")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="check a spec without running it")
    p.add_argument("spec")
    p.add_argument("--deep", action="store_true",
                   help="also build the models, resolve the layers, find the images and read "
                   "the first one (with its label); prune specs: build the model and "
                   "resolve the layers to prune")
    p.add_argument("--kind", choices=["run", "prune"],
                   help="the spec's kind (default: prune when it has prune fields such as "
                   "criteria, else run)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("schema", help="print (or write) the JSON Schema of run specs "
                       "(--kind prune: of prune specs)")
    p.add_argument("--out", help="write the schema to this file")
    p.add_argument("--kind", choices=["run", "prune"], default="run",
                   help="which specs: run (default) or prune")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("plugins", help="list registered plugins and who provides them")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("layers", help="list a model's layers with output shapes")
    p.add_argument("model_spec", metavar="MODEL_SPEC",
                   help="a run spec, a model spec file, or inline YAML such as "
                   "'{architecture: {name: fcn, depth: 6}}'")
    p.add_argument("--model", help="which model of a run spec (default: the first)")
    p.add_argument("--input-size", nargs=2, type=int, default=(64, 64), metavar=("H", "W"),
                   help="input height and width for the trial forward pass (default 64 64)")
    p.set_defaults(func=_cmd_layers)

    # subcommands that live beside their implementation
    from mapsim.data_cli import add_data_parser
    from mapsim.plots.commands import add_parsers as add_plot_parsers
    from mapsim.training.commands import add_parsers as add_training_parsers

    add_plot_parsers(sub)  # plot, show maps, show kernels
    add_data_parser(sub)  # data synth
    add_training_parsers(sub)  # train, evaluate, models
    from mapsim.pruning.commands import add_parser as add_prune_parser

    add_prune_parser(sub)  # prune
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mapsim`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except MapsimError as exc:
        from mapsim.runner.distributed import RunAborted

        if not (isinstance(exc, RunAborted) and os.environ.get("RANK", "0") != "0"):
            # (a process stopped by another's failure stays quiet: rank 0 reports it)
            print(f"mapsim: error: {exc}", file=sys.stderr)
            _print_notes(exc)
        return 2
    except KeyboardInterrupt as exc:
        print("mapsim: interrupted; no results were published", file=sys.stderr)
        _print_notes(exc)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except OSError as exc:  # the file system refused (a full disk, permissions, ...)
        print(f"mapsim: error: {describe_os_error(exc)}", file=sys.stderr)
        _print_notes(exc)
        return 2


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which file, what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    text = f"{exc.strerror or exc}{where}"
    if exc.errno == errno.ENOSPC:
        text += ("; free some space (or write elsewhere with --out) and run again; an "
                 "interrupted run keeps its finished blocks for --resume")
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text += "; choose a folder you can write to with --out"
    return text


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """mapsim's own warnings as one line each; others as Python prints them."""
    from mapsim.errors import MapsimWarning

    if issubclass(category, MapsimWarning):
        print(f"mapsim: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="",
              file=sys.stderr)


def _print_notes(exc: BaseException) -> None:
    for note in getattr(exc, "__notes__", ()):
        print(f"mapsim: {note}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
