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
        return validate_prune(args.spec, deep=True)
    target = run_prune(spec, base, out, overwrite=args.overwrite, device=args.device,
                       progress=args.progress)
    print(f"wrote {target}: prune.csv, prune_summary.csv, prune_answer.csv, prune.png, "
          "prune.html, prune.json" + (", models/" if spec.save_models else ""))
    return 0


def validate_prune(path: str, deep: bool = False) -> int:
    """``mapsim validate PRUNE_SPEC``: check the fields; with ``deep`` also build the model,
    trace it and resolve the layers on one calibration image."""
    from mapsim.spec.prune_spec import load_prune_spec

    spec = load_prune_spec(path)
    line = (f"{path} is a valid prune spec: criteria {', '.join(c.name for c in spec.criteria)}"
            f"; {len(spec.sparsity)} sparsity level(s){' + threshold' if spec.threshold else ''}"
            f"; {len(spec.seeds)} seed(s)")
    if deep:
        layers = check_layers(spec, Path(path).resolve().parent)
        line += f"; model built and traced, layers: {', '.join(layers)}"
    print(line)
    if not deep:
        print("(fields only: add --deep to also build the model and resolve the layers)")
    return 0


def check_layers(spec, base: Path) -> list[str]:
    """Build the spec's model, trace it on the first calibration image and resolve its
    layers; returns them (raises what pruning would)."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from mapsim.pruning.graph import make_graph
    from mapsim.pruning.prune import resolve_layers
    from mapsim.registry import load_registry
    from mapsim.training.data import load_samples
    from mapsim.training.loop import build_training_model

    registry = load_registry()
    choice = spec.calibration
    data = registry.create("dataset", choice.name, choice.model_dump(exclude={"name"}),
                           base_dir=base)
    first = load_samples(data, spec.normalise, "calibration")[:1]
    model = build_training_model(SimpleNamespace(name=spec.name, model=spec.model,
                                                 seed=spec.seeds[0]), registry, base).module
    example = torch.from_numpy(np.stack([s.image for s in first]))
    return resolve_layers(make_graph(model, example, spec.backend), spec.layers)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``prune`` to the subcommands."""
    p = sub.add_parser("prune", help="prune a network by criteria and sparsities, and score it")
    p.add_argument("spec", help="prune spec (YAML, TOML or JSON)")
    p.add_argument("--out", help="results folder (default: runs/<name> beside the spec)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--validate", action="store_true",
                   help="only check the spec, the model and its layers")
    p.add_argument("--device", help="override the spec's device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--progress", action="store_true", help="print each pruning as it starts")
    p.set_defaults(func=_cmd_prune)
