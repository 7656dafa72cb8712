#!/usr/bin/env bash
# Targets in RAM vs read from the store (`tcskd train --targets ram|store`) on the built-in default:
# method tcs (basis pca, its coordinates), 10 labels per class and all labels, seeds 0 1 2, student cnn,
# 15 epochs, one DataLoader worker and one torch thread per run, two runs side by side. The store runs use a
# small LRU (TARGET_CACHE_MB, 1 MB) so that they really stream their targets from the chunks; MODES may add
# storeN (an N MB LRU, e.g. store16: the floor of the default budget).
# Resumable: a run with a final.json is skipped. Every knob is an environment variable.
set -euo pipefail
source "$(dirname "$0")/common.sh"
TCSKD=${TCSKD:-tcskd}
RUNS=${RUNS:-runs/store-vs-ram}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-15}
IMAGE_SIZE=${IMAGE_SIZE:-112}
DEVICE=${DEVICE:-auto}
STUDENT=${STUDENT:-cnn}
LPCS=${LPCS:-"10 all"}
JOBS=${JOBS:-2}
WORKERS=${WORKERS:-1}
TARGET_CACHE_MB=${TARGET_CACHE_MB:-1}
MODES=${MODES:-"ram store store16"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
mkdir -p "$RUNS"

echo "== stage 1: teacher features" >&2
build_caches
echo "== stage 2: the pca basis (coordinates stored), fitted without the validation rows" >&2
fit_basis pca pca

echo "== stage 3: {$MODES} x labels {$LPCS} x seeds {$SEEDS}, $JOBS at a time" >&2
jobs_file=$(mktemp)
for lpc in $LPCS; do
  for seed in $SEEDS; do
    for mode in $MODES; do
      out="$RUNS/tcs-$mode-lpc$lpc-s$seed"
      [ -f "$out/final.json" ] && continue
      case $mode in
        ram) extra="--targets ram" ;;
        store) extra="--targets store --target-cache-mb $TARGET_CACHE_MB" ;;
        store*) extra="--targets store --target-cache-mb ${mode#store}" ;;
        *) echo "unknown mode $mode (ram, store, storeN)" >&2; exit 2 ;;
      esac
      [ "$lpc" != all ] && extra="$extra --labels-per-class $lpc"
      echo "rm -rf $out && $TCSKD -q train --cache $train_cache --method tcs --basis pca --student $STUDENT \
--epochs $EPOCHS --seed $seed --device $DEVICE --workers $WORKERS --out $out $extra >/dev/null \
&& echo trained $out >&2" >> "$jobs_file"
    done
  done
done
xargs -a "$jobs_file" -d '\n' -P "$JOBS" -I{} bash -c '{}'
rm -f "$jobs_file"

# `tcskd report` groups by the run's options, not by --targets: one table per mode.
echo "== report" >&2
for mode in $MODES; do
  echo "### $mode"
  $TCSKD report "$RUNS"/tcs-$mode-lpc*/
done | tee "$RUNS/report.md"
echo "store vs ram finished in $(( $(date +%s) - start )) s; report: $RUNS/report.md" >&2
