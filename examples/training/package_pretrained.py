"""Copy trained networks into the package: ``NAME.safetensors`` + ``NAME.json`` cards.

Usage: ``python examples/training/package_pretrained.py WORK DEST [NAME ...]`` (default
names: the five CNNs) where WORK holds, per network NAME, ``NAME/`` (the ``mapsim train``
folder), ``NAME.log`` (its console output) and ``heldout/`` (``mapsim evaluate`` results on
the held-out images, models named as the networks, its console output in ``heldout.log``).
Each card is the training card plus the training output (the epoch lines and the final
summary), the per-epoch log, the wall time of the training command when its log ends with the
shell's ``time`` report (``real 2m1.298s``) and the held-out scores.

The U-Net was trained on its own (``NETWORKS=unet examples/training/train_all.sh``, on one
H200) and packaged with ``WORK=runs/pretrained-unet``: ``... package_pretrained.py
runs/pretrained-unet src/mapsim/pretrained unet``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pandas as pd

NAMES = ("cnn1", "cnn6", "cnn6-s2", "cnn10", "cnn10-s2")
EPOCH_LINE = re.compile(r"^(epoch \d+/\d+: loss|best epoch|weights:)")
WALL = re.compile(r"^real\s+(\d+)m([\d.]+)s$")


def training_output(log: Path) -> tuple[list[str], float | None]:
    """The epoch lines and final summary of a training's console output (progress bars
    dropped), and its wall time in seconds when the shell's ``time`` report is there."""
    lines = [ln.strip() for ln in log.read_text().replace("\r", "\n").splitlines()]
    wall = None
    for line in lines:
        match = WALL.match(line)
        if match:
            wall = round(60 * int(match.group(1)) + float(match.group(2)), 1)
    return [ln for ln in lines if EPOCH_LINE.match(ln)], wall


def main(work: Path, dest: Path, names: tuple[str, ...] = NAMES) -> None:
    heldout = work / "heldout"
    evaluation = json.loads((heldout / "evaluation.json").read_text())
    summary = pd.read_csv(heldout / "summary.csv")
    per_image = pd.read_csv(heldout / "per_image.csv")
    command = (work / "heldout.log").read_text().splitlines() if (work / "heldout.log").exists() \
        else []
    evaluated = " ".join(f"{n}=..." for n in names)
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        run = work / name
        card = json.loads((run / "best.json").read_text())
        card["training_output"], wall = training_output(work / f"{name}.log")
        if wall is not None:
            card["time"]["wall_seconds"] = wall
        card["history"] = pd.read_csv(run / "log.csv").to_dict(orient="records")
        rows = summary[summary.model == name].set_index("metric")
        card["held_out"] = {
            "data": evaluation["data"],
            "command": f"mapsim evaluate {evaluated} "
                       "--data examples/training/heldout.yaml --no-panels",
            "output": command,
            "device": evaluation.get("device"),
            "n_images": int(rows["n_images"].iloc[0]),
            "mean": rows["mean"].to_dict(),
            "std": rows["std"].to_dict(),
            "pooled": rows["pooled"].to_dict(),
            "per_image": per_image[per_image.model == name][["image", "iou", "cldice"]]
            .to_dict(orient="records"),
        }
        shutil.copyfile(run / "best.safetensors", dest / f"{name}.safetensors")
        (dest / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
        print(f"{name}: epoch {card['epoch']}, held-out IoU {card['held_out']['mean']['iou']:.4f}"
              f", clDice {card['held_out']['mean']['cldice']:.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), tuple(sys.argv[3:]) or NAMES)
