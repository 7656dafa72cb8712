#!/usr/bin/env bash
# The main job on the built-in default, as the recipe recipes/default.yaml: cache -> basis -> train (ce,
# fitnet, tcs with its defaults) at all labels and at 10 labels per class, the teacher's reference accuracy
# at the same label budgets, and the comparison report (printed, and RUNS/report.md, RUNS/report.png).
# Every run holds out the same validation rows; the basis is fitted without them; the test split is
# evaluated once per run. Resumable: run it again and only what is missing is computed.
# Driven by `make demo`; every knob is an environment variable, passed to `tcskd run` as --set overrides.
set -euo pipefail
TCSKD=${TCSKD:-tcskd}
RUNS=${RUNS:-runs/demo}
SEEDS=${SEEDS:-0}
EPOCHS=${EPOCHS:-15}
DIM=${DIM:-}          # empty: the defaults of tcskd train (chosen on validation, see README)
LAMBDA=${LAMBDA:-}
IMAGE_SIZE=${IMAGE_SIZE:-112}
DEVICE=${DEVICE:-auto}
STUDENT=${STUDENT:-cnn}
LPCS=${LPCS:-"all 10"}
METHODS=${METHODS:-"ce fitnet tcs"}
start=$(date +%s)

list() { local IFS=,; echo "[$*]"; }   # words -> a YAML list
lpcs=$(list $(for l in $LPCS; do [ "$l" = all ] && echo null || echo "$l"; done))
sets=(--set "out=$RUNS" --set "device=$DEVICE" --set "cache.image_size=$IMAGE_SIZE" --set "train.epochs=$EPOCHS"
      --set "train.student=$STUDENT" --set "grid.labels_per_class=$lpcs" --set "grid.method=$(list $METHODS)"
      --set "grid.seed=$(list $SEEDS)")
[ -n "$DIM" ] && sets+=(--set "train.dim=$DIM")
[ -n "$LAMBDA" ] && sets+=(--set "train.lam=$LAMBDA")
$TCSKD run "$(dirname "$0")/../recipes/default.yaml" "${sets[@]}"
echo "demo finished in $(( $(date +%s) - start )) s; report: $RUNS/report.md, chart: $RUNS/report.png" >&2
