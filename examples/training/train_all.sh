#!/bin/bash
# How the bundled networks were made (run from the repository root, on one GPU): the
# trainings run side by side (NETWORKS, default the five CNNs: CNN1, CNN6 and CNN10 and a
# second seed of CNN6 and CNN10), then the held-out evaluation of the same networks, then the
# packaging of weights + cards into src/mapsim/pretrained/ (or the folder given as $1). Each
# network has its own recorded seed (see its spec), so no two start from the same weights.
# STAGE=train does only the trainings, STAGE=package only the evaluation and packaging.
#
# The CNNs: examples/training/train_all.sh                          (one H100, ~3 min each)
# The U-Net: WORK=runs/pretrained-unet NETWORKS=unet examples/training/train_all.sh
#            (one H200, wall 121 s; the held-out evaluation and packaging ran on a CPU with
#            STAGE=package after copying the training folder and log into $WORK)
set -euo pipefail
work=${WORK:-runs/pretrained}
dest=${1:-src/mapsim/pretrained}
networks=${NETWORKS:-cnn1 cnn6 cnn6-s2 cnn10 cnn10-s2}
stage=${STAGE:-all}
mkdir -p "$work"
if [ "$stage" != package ]; then
  for n in $networks; do
    # the shell's time report ends the log: the card records the wall time from it
    { time mapsim train "examples/training/$n.yaml" --out "$work/$n" --overwrite; } \
      > "$work/$n.log" 2>&1 &
  done
  wait
fi
if [ "$stage" != train ]; then
  models=""
  for n in $networks; do models="$models $n=$work/$n/best.safetensors"; done
  mapsim evaluate $models --data examples/training/heldout.yaml \
    --out "$work/heldout" --overwrite --no-panels --quiet | tee "$work/heldout.log"
  # shellcheck disable=SC2086
  python examples/training/package_pretrained.py "$work" "$dest" $networks
fi
