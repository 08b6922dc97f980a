"""Issue 16's experiment: prune the bundled CNN6 and CNN10 layer by layer with every criterion.

    python examples/pruning/run_experiment.py --out runs/prune-experiment            # GPU
    python examples/pruning/run_experiment.py --out /tmp/tiny --tiny --device cpu     # CI size

Runs ``mapsim prune`` on ``cnn6.yaml`` and ``cnn10.yaml`` (beside this file) into
``OUT/cnn6`` and ``OUT/cnn10`` (each a full prune results folder: prune.csv, summaries,
prune.png, prune.html, prune.json) and writes ``OUT/answer.md``: per network, criterion and
layer, the maps each criterion removes within the IoU tolerance right after pruning and after
fine-tuning (mean over seeds), and the wall time of each network. ``--tiny`` shrinks
everything (two layers, two criteria, one sparsity, one seed, a few small images, one epoch)
so that the whole pipeline runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
NETWORKS = ("cnn6", "cnn10")


def tiny(spec: dict) -> dict:
    """The spec shrunk to a CPU smoke test of the same pipeline."""
    small = {"count": 2, "size": [32, 32]}
    spec = dict(spec)
    spec.update(criteria=["correlation-compensated", "l1"], sparsity=[0.25], threshold=False,
                layers=["blocks.0", "blocks.1"], seeds=[0])
    spec["calibration"] = {**spec["calibration"], **small}
    spec["evaluation"] = {**spec["evaluation"], **small}
    spec["finetune"] = {**spec["finetune"], "epochs": 1, "batch_size": 2,
                        "data": {**spec["finetune"]["data"], **small}}
    return spec


def answer_markdown(answers: dict[str, pd.DataFrame], seconds: dict[str, float]) -> str:
    """``answer.md``: one table per network (maps removed within the tolerance)."""
    lines = ["# Maps removable within the IoU tolerance (mean over seeds)", ""]
    for net, table in answers.items():
        lines += [f"## {net} ({seconds[net]:.0f} s)", "",
                  "| criterion | layer | sparsity, pruned | maps, pruned | sparsity, "
                  "fine-tuned | maps, fine-tuned |", "|---|---|---|---|---|---|"]
        for row in table.itertuples():
            lines.append(f"| {row.criterion} | {row.layers} | {row.sparsity_pruned:g} | "
                         f"{row.maps_removed_pruned:g} | {row.sparsity_finetuned:g} | "
                         f"{row.maps_removed_finetuned:g} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; returns 0."""
    from mapsim.io.atomic import atomic_path
    from mapsim.pruning.experiment import run_prune
    from mapsim.spec.prune_spec import validate_prune_spec
    from mapsim.spec.run_spec import read_document

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of the results")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke-test size")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    parser.add_argument("--networks", default=",".join(NETWORKS),
                        help="comma-separated, of cnn6,cnn10")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--progress", action="store_true", help="print each pruning")
    args = parser.parse_args(argv)
    out = Path(args.out)
    answers, seconds = {}, {}
    for net in args.networks.split(","):
        data = read_document(HERE / f"{net}.yaml")
        if args.tiny:
            data = tiny(data)
        spec = validate_prune_spec(data, str(HERE / f"{net}.yaml"))
        started = time.perf_counter()
        target = run_prune(spec, HERE, out / net, overwrite=args.overwrite,
                           device=args.device, progress=args.progress)
        seconds[net] = time.perf_counter() - started
        answers[net] = pd.read_csv(target / "prune_answer.csv")
        print(f"{net}: {seconds[net]:.1f} s -> {target}", flush=True)
        with atomic_path(out / "answer.md") as tmp:  # after each network: a cut run keeps it
            tmp.write_text(answer_markdown(answers, seconds), encoding="utf-8")
    print(f"wrote {out / 'answer.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
