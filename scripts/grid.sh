#!/usr/bin/env bash
# The validation grid on the built-in default: which idea does what, and which settings `tcskd train
# --method tcs` uses by default. Every run holds out the same seeded, stratified 10 % of the training
# split (val); settings are read off the val column, over seeds; the test column is evaluated once per
# run, after training, and is only read for the chosen settings.
# Driven by `make grid`; every knob is an environment variable. JOBS runs train side by side.
set -euo pipefail
source "$(dirname "$0")/common.sh"
TCSKD=${TCSKD:-tcskd}
RUNS=${RUNS:-runs/grid}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-15}
IMAGE_SIZE=${IMAGE_SIZE:-112}
DEVICE=${DEVICE:-auto}
STUDENT=${STUDENT:-cnn}
LPCS=${LPCS:-"10 all"}
JOBS=${JOBS:-2}
# One share of the cores per run side by side (the README's table: 2 cores, JOBS=2, one thread each).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
WORKERS=${WORKERS:-0}
ONLY=${ONLY:-}          # a space-separated subset of the configuration names below
start=$(date +%s)
mkdir -p "$RUNS"

# name | options of tcskd train (besides cache, student, epochs, seed, labels)
CONFIGS=(
  "ce|--method ce"
  "fitnet|--method fitnet"
  "tcs-k32|--basis pca --dim 32"
  "tcs-k64|--basis pca --dim 64"
  "tcs-k128|--basis pca --dim 128"
  "tcs-k64-lam3|--basis pca --dim 64 --lambda 3"
  "tcs-k64-lam30|--basis pca --dim 64 --lambda 30"
  "tcs-k64-random|--basis random --dim 64"
  "tcs-k64-coords|--basis pca --dim 64 --classify-from coords"
  "tcs-k64-elsh|--basis pca --dim 64 --elsh-bits 256"
  "tail-grad|--basis pca --dim 256 --select-every 1 --drop-frac 0.2 --min-dim 64 --select-by grad"
  "tail-error|--basis pca --dim 256 --select-every 1 --drop-frac 0.2 --min-dim 64 --select-by error"
  "tail-worst|--basis pca --dim 256 --select-every 1 --drop-frac 0.2 --min-dim 64 --select-by worst"
  "tcs-k256-coords|--basis pca --dim 256 --classify-from coords"
  "tail-grad-coords|--basis pca --dim 256 --select-every 1 --drop-frac 0.2 --min-dim 64 --select-by grad --classify-from coords"
  "tail-taylor-coords|--basis pca --dim 256 --select-every 1 --drop-frac 0.2 --min-dim 64 --select-by taylor --classify-from coords"
)

echo "== stage 1: teacher features" >&2
build_caches

echo "== stage 2: bases fitted without the validation rows" >&2
fit_basis pca pca
fit_basis random random

echo "== the teacher's reference at each label budget" >&2
teacher_evals

echo "== stage 3: $(( ${#CONFIGS[@]} )) configurations x labels {$LPCS} x seeds {$SEEDS}, $JOBS at a time" >&2
jobs_file=$(mktemp)
for entry in "${CONFIGS[@]}"; do
  name=${entry%%|*}
  extra=${entry#*|}
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  for lpc in $LPCS; do
    for seed in $SEEDS; do
      out="$RUNS/$name-lpc$lpc-s$seed"
      [ -f "$out/final.json" ] && continue
      budget=""
      [ "$lpc" != all ] && budget="--labels-per-class $lpc"
      echo "rm -rf $out && $TCSKD -q train --cache $train_cache --student $STUDENT --epochs $EPOCHS --seed $seed \
--device $DEVICE --workers $WORKERS --out $out $budget $extra >/dev/null && echo trained $out >&2" >> "$jobs_file"
    done
  done
done
xargs -a "$jobs_file" -d '\n' -P "$JOBS" -I{} bash -c '{}'
rm -f "$jobs_file"

echo "== report" >&2
report
echo "grid finished in $(( $(date +%s) - start )) s; report: $RUNS/report.md" >&2
