#!/usr/bin/env bash
# The main job on the built-in default: cache -> basis -> train (ce, fitnet, tcs
# with a PCA basis, tcs with a random basis) at all labels and at 10 labels per
# class, the teacher's reference accuracy, and the comparison report.
# Driven by `make demo`; every knob is an environment variable.
set -euo pipefail
TCSKD=${TCSKD:-tcskd}
RUNS=${RUNS:-runs/demo}
SEEDS=${SEEDS:-0}
EPOCHS=${EPOCHS:-15}
DIM=${DIM:-64}
LAMBDA=${LAMBDA:-10}
IMAGE_SIZE=${IMAGE_SIZE:-112}
DEVICE=${DEVICE:-auto}
STUDENT=${STUDENT:-cnn}
LPCS=${LPCS:-"all 10"}
METHODS=${METHODS:-"ce fitnet tcs"}
start=$(date +%s)
mkdir -p "$RUNS"

echo "== stage 1: teacher features (cached once; a second run is a cache hit)" >&2
opts=(--data builtin:mnist5k --teacher builtin:efficientnet-lite0 --image-size "$IMAGE_SIZE" --device "$DEVICE")
train_cache=$($TCSKD cache "${opts[@]}" --split train | tail -n1)
test_cache=$($TCSKD cache "${opts[@]}" --split test | tail -n1)

echo "== stage 2: coordinate systems (PCA, and a random orthonormal basis as the ablation)" >&2
$TCSKD basis --cache "$train_cache" --name pca --kind pca --dim "$DIM" --coords --device "$DEVICE"
$TCSKD basis --cache "$train_cache" --name random --kind random --dim "$DIM" --coords --device "$DEVICE"

echo "== the teacher's reference accuracy from cached features" >&2
$TCSKD eval --cache "$train_cache" --test-cache "$test_cache" --device "$DEVICE" --out "$RUNS/teacher-eval.json"

echo "== stage 3: students (the teacher never runs here)" >&2
for lpc in $LPCS; do
  for method in $METHODS; do
    for seed in $SEEDS; do
      out="$RUNS/$method-lpc$lpc-s$seed"
      if [ -f "$out/final.json" ]; then echo "done already: $out" >&2; continue; fi
      rm -rf "$out"
      args=(--cache "$train_cache" --student "$STUDENT" --epochs "$EPOCHS" --dim "$DIM" --lambda "$LAMBDA"
            --seed "$seed" --device "$DEVICE" --out "$out")
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
$TCSKD report "$RUNS"/*-lpc*/ --teacher-eval "$RUNS/teacher-eval.json" --png "$RUNS/report.png" | tee "$RUNS/report.md"
echo "demo finished in $(( $(date +%s) - start )) s; report: $RUNS/report.md, chart: $RUNS/report.png" >&2
