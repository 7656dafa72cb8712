#!/usr/bin/env bash
# The main job on the built-in default: cache -> basis -> train (ce, fitnet, tcs
# with its defaults, optionally tcs with a random basis) at all labels and at 10
# labels per class, the teacher's reference accuracy at the same label budgets,
# and the comparison report. Every run holds out the same validation rows; the
# bases are fitted without them; the test split is evaluated once per run.
# Driven by `make demo`; every knob is an environment variable.
set -euo pipefail
source "$(dirname "$0")/common.sh"
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
mkdir -p "$RUNS"

echo "== stage 1: teacher features (cached once; a second run is a cache hit)" >&2
build_caches

echo "== stage 2: coordinate systems without the validation rows (PCA, and a random orthonormal basis)" >&2
fit_basis pca pca
if [[ " $METHODS " == *" tcs-random "* ]]; then fit_basis random random; fi

echo "== the teacher's reference accuracy from cached features, at the students' label budgets" >&2
teacher_evals

echo "== stage 3: students (the teacher never runs here)" >&2
for lpc in $LPCS; do
  for method in $METHODS; do
    for seed in $SEEDS; do
      out="$RUNS/$method-lpc$lpc-s$seed"
      if [ -f "$out/final.json" ]; then echo "done already: $out" >&2; continue; fi
      rm -rf "$out"
      args=(--cache "$train_cache" --student "$STUDENT" --epochs "$EPOCHS" --seed "$seed" --device "$DEVICE"
            --out "$out")
      [ -n "$DIM" ] && args+=(--dim "$DIM")
      [ -n "$LAMBDA" ] && args+=(--lambda "$LAMBDA")
      [ "$lpc" != all ] && args+=(--labels-per-class "$lpc")
      case $method in
        ce) args+=(--method ce --basis pca) ;;
        fitnet) args+=(--method fitnet --basis pca) ;;
        tcs) args+=(--method tcs --basis pca) ;;
        tcs-random) args+=(--method tcs --basis random) ;;
      esac
      $TCSKD -q train "${args[@]}" >/dev/null
      echo "trained $out" >&2
    done
  done
done

echo "== report" >&2
report
echo "demo finished in $(( $(date +%s) - start )) s; report: $RUNS/report.md, chart: $RUNS/report.png" >&2
