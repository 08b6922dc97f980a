"""The ``mapsim prune`` subcommand (registered by :mod:`mapsim.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_prune(args: argparse.Namespace) -> int:
    from mapsim.pruning.experiment import run_prune
    from mapsim.spec.prune_spec import load_prune_spec

    spec = load_prune_spec(args.spec)
    base = Path(args.spec).resolve().parent
    out = Path(args.out) if args.out else base / "runs" / spec.name
    if args.validate:
        print(f"{args.spec}: the prune spec is valid")
        return 0
    target = run_prune(spec, base, out, overwrite=args.overwrite)
    print(f"wrote {target / 'prune.csv'} and {target / 'prune.json'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``prune`` to the subcommands."""
    p = sub.add_parser("prune", help="prune a network by criteria and sparsities, and score it")
    p.add_argument("spec", help="prune spec (YAML, TOML or JSON)")
    p.add_argument("--out", help="results folder (default: runs/<name> beside the spec)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--validate", action="store_true", help="only check the spec")
    p.set_defaults(func=_cmd_prune)
