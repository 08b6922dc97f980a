#!/bin/bash
# How the bundled networks were made (run from the repository root, on one GPU):
# the three trainings run side by side, then the held-out evaluation, then the packaging of
# weights + cards into src/mapsim/pretrained/ (or the folder given as $1).
set -euo pipefail
work=${WORK:-runs/pretrained}
dest=${1:-src/mapsim/pretrained}
mkdir -p "$work"
for n in 1 6 10; do
  mapsim train examples/training/cnn$n.yaml --out "$work/cnn$n" --overwrite \
    > "$work/cnn$n.log" 2>&1 &
done
wait
mapsim evaluate cnn1="$work/cnn1/best.safetensors" cnn6="$work/cnn6/best.safetensors" \
  cnn10="$work/cnn10/best.safetensors" --data examples/training/heldout.yaml \
  --out "$work/heldout" --overwrite --no-panels --quiet | tee "$work/heldout.log"
python examples/training/package_pretrained.py "$work" "$dest"
