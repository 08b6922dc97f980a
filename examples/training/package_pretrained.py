"""Copy trained networks into the package: ``cnnN.safetensors`` + ``cnnN.json`` cards.

Usage: ``python examples/training/package_pretrained.py WORK DEST`` where WORK holds, per
network N, ``cnnN/`` (the ``mapsim train`` folder), ``cnnN.log`` (its console output) and
``heldout/`` (``mapsim evaluate`` results on the held-out images, models named cnnN). Each card
is the training card plus the training output (the epoch lines and the final summary), the
per-epoch log and the held-out scores.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pandas as pd

NAMES = ("cnn1", "cnn6", "cnn6-s2", "cnn10", "cnn10-s2")


def main(work: Path, dest: Path) -> None:
    heldout = work / "heldout"
    evaluation = json.loads((heldout / "evaluation.json").read_text())
    summary = pd.read_csv(heldout / "summary.csv")
    per_image = pd.read_csv(heldout / "per_image.csv")
    command = (work / "heldout.log").read_text().splitlines() if (work / "heldout.log").exists() \
        else []
    dest.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        run = work / name
        card = json.loads((run / "best.json").read_text())
        text = (run.parent / f"{name}.log").read_text().replace("\r", "\n")
        lines = [ln.strip() for ln in text.splitlines()
                 if re.match(r"^(epoch \d+/\d+: loss|best epoch|weights:)", ln.strip())]
        card["training_output"] = lines
        card["history"] = pd.read_csv(run / "log.csv").to_dict(orient="records")
        rows = summary[summary.model == name].set_index("metric")
        card["held_out"] = {
            "data": evaluation["data"],
            "command": "mapsim evaluate cnn1=... cnn6=... cnn6-s2=... cnn10=... cnn10-s2=... "
                       "--data examples/training/heldout.yaml --no-panels",
            "output": command,
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
    main(Path(sys.argv[1]), Path(sys.argv[2]))
