#!/usr/bin/env bash
# The validation grid on the built-in default: which idea does what (PCA against random at K = 4..64 among it),
# and which settings `tcskd train
# --method tcs` uses by default. Every run holds out the same seeded, stratified 10 % of the training
# split (val); settings are read off the val column, over seeds; the test column is evaluated once per
# run, after training, and is only read for the chosen settings.
# Driven by `make grid`; every knob is an environment variable. JOBS runs train side by side.
set -euo pipefail
source "$(dirname "$0")/common.sh"
RUNS=${RUNS:-runs/grid}
JOBS=${JOBS:-2}
# One share of the cores per run side by side (the README's table: 2 cores, JOBS=2, one thread each).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
WORKERS=${WORKERS:-0}
start=$(date +%s)

# name | options of tcskd train (besides cache, student, epochs, seed, labels). Each row pins every option the
# README's table shows (method, basis, dim, lambda, tailoring, eLSH bits, classifier on) instead of relying on
# tcskd train's defaults, which may change; `scripts/grid.sh --print` lists them as training resolves them.
FIXED="--tailor off --elsh-bits 0"
TAILORED="--tailor on --select-every 1 --drop-frac 0.2 --min-dim 64 --elsh-bits 0"
CONFIGS=(
  "ce|--method ce --lambda 0 --classify-from feature $FIXED"
  "fitnet|--method fitnet --lambda 10 --classify-from feature $FIXED"
  "tcs-k32|--method tcs --basis pca --dim 32 --lambda 10 --classify-from feature $FIXED"
  "tcs-k64|--method tcs --basis pca --dim 64 --lambda 10 --classify-from feature $FIXED"
  "tcs-k128|--method tcs --basis pca --dim 128 --lambda 10 --classify-from feature $FIXED"
  "tcs-k64-lam3|--method tcs --basis pca --dim 64 --lambda 3 --classify-from feature $FIXED"
  "tcs-k64-lam30|--method tcs --basis pca --dim 64 --lambda 30 --classify-from feature $FIXED"
  "tcs-k64-random|--method tcs --basis random --dim 64 --lambda 10 --classify-from feature $FIXED"
  "tcs-k4|--method tcs --basis pca --dim 4 --lambda 10 --classify-from feature $FIXED"
  "tcs-k8|--method tcs --basis pca --dim 8 --lambda 10 --classify-from feature $FIXED"
  "tcs-k16|--method tcs --basis pca --dim 16 --lambda 10 --classify-from feature $FIXED"
  "tcs-k4-random|--method tcs --basis random --dim 4 --lambda 10 --classify-from feature $FIXED"
  "tcs-k8-random|--method tcs --basis random --dim 8 --lambda 10 --classify-from feature $FIXED"
  "tcs-k16-random|--method tcs --basis random --dim 16 --lambda 10 --classify-from feature $FIXED"
  "tcs-k32-random|--method tcs --basis random --dim 32 --lambda 10 --classify-from feature $FIXED"
  "tcs-k64-coords|--method tcs --basis pca --dim 64 --lambda 10 --classify-from coords $FIXED"
  "tcs-k64-elsh|--method tcs --basis pca --dim 64 --lambda 10 --classify-from feature --tailor off --elsh-bits 256"
  "tail-ablation|--method tcs --basis pca --dim 256 --lambda 10 --select-by ablation --classify-from feature $TAILORED"
  "tail-error|--method tcs --basis pca --dim 256 --lambda 10 --select-by error --classify-from feature $TAILORED"
  "tail-worst|--method tcs --basis pca --dim 256 --lambda 10 --select-by worst --classify-from feature $TAILORED"
  "tcs-k256-coords|--method tcs --basis pca --dim 256 --lambda 10 --classify-from coords $FIXED"
  "tail-ablation-coords|--method tcs --basis pca --dim 256 --lambda 10 --select-by ablation --classify-from coords $TAILORED"
  "tail-ablation-ce-coords|--method tcs --basis pca --dim 256 --lambda 10 --select-by ablation-ce --classify-from coords $TAILORED"
  "tail-taylor-coords|--method tcs --basis pca --dim 256 --lambda 10 --select-by taylor --classify-from coords $TAILORED"
)

# The options of tcskd train for configuration ENTRY at label budget LPC (besides cache, seed and the run's
# device, workers and directory): the same for --print and for training.
run_options() {
  local budget=""
  [ "$2" != all ] && budget="--labels-per-class $2"
  echo "--student $STUDENT --epochs $EPOCHS $budget ${1#*|}"
}

# --print: one line per configuration x label budget, NAME-lpcL<TAB>the options that define its row of the
# report as tcskd train resolves them (JSON; no cache is built or opened, nothing is trained).
if [ "${1:-}" = --print ]; then
  list=$(mktemp)
  trap 'rm -f "$list"' EXIT
  for entry in "${CONFIGS[@]}"; do
    name=${entry%%|*}
    wanted "$name" || continue
    for lpc in $LPCS; do
      printf '%s\t%s\n' "$name-lpc$lpc" "--cache TRAIN_CACHE $(run_options "$entry" "$lpc")" >> "$list"
    done
  done
  $TCSKD train --print-configs "$list"
  exit 0
fi
mkdir -p "$RUNS"

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
  wanted "$name" || continue
  for lpc in $LPCS; do
    for seed in $SEEDS; do
      out="$RUNS/$name-lpc$lpc-s$seed"
      [ -f "$out/final.json" ] && continue
      echo "rm -rf $out && $TCSKD -q train --cache $train_cache $(run_options "$entry" "$lpc") --seed $seed \
--device $DEVICE --workers $WORKERS --out $out >/dev/null && echo trained $out >&2" >> "$jobs_file"
    done
  done
done
xargs -a "$jobs_file" -d '\n' -P "$JOBS" -I{} bash -c '{}'
rm -f "$jobs_file"

echo "== report" >&2
kept=()
compgen -G "$RUNS/tail-*-lpc*/final.json" >/dev/null && kept=(--kept "$RUNS/kept-ranks.png")
report "${kept[@]}"
# PCA against random as K shrinks: the tcs rows that differ only in K and the basis, one line per basis.
sweep=()
for k in 4 8 16 32 64; do
  for b in "" -random; do
    for d in "$RUNS/tcs-k$k$b"-lpc*/; do [ -f "$d/final.json" ] && sweep+=("$d"); done
  done
done
if [ ${#sweep[@]} -gt 0 ]; then
  $TCSKD report "${sweep[@]}" --sweep dim --series basis \
    $(for f in "$RUNS"/teacher-lpc*.json; do echo --teacher-eval "$f"; done) --png "$RUNS/ksweep.png" \
    > "$RUNS/ksweep.md"
fi
echo "grid finished in $(( $(date +%s) - start )) s; report: $RUNS/report.md" >&2
