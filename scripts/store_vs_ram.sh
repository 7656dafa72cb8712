#!/usr/bin/env bash
# Targets in RAM vs read from the store (`tcskd train --targets ram|store`) on the built-in default:
# method tcs (basis pca, K = 64, lambda 10, no tailoring, the classifier on the feature: pinned, whatever
# tcskd train's defaults), 10 labels per class and all labels, seeds 0 1 2, student cnn, 15 epochs, one
# DataLoader worker and one torch thread per run, two runs side by side. MODES:
#   ram           targets in RAM (the cache's rows in the default order, shuffled);
#   store         read from that cache with a small LRU (TARGET_CACHE_MB, 1 MB: a window of one or two of
#                 its four chunks), so that they really stream from the chunks;
#   store-source  the same from a cache written with --order source (rows in class order, as an image
#                 folder's): what the shuffled order fixes;
#   storeN        an N MB LRU on the shuffled cache (e.g. store16: every chunk in the window).
# Resumable: a run with a final.json is skipped. Every knob is an environment variable.
set -euo pipefail
source "$(dirname "$0")/common.sh"
RUNS=${RUNS:-runs/store-vs-ram}
JOBS=${JOBS:-2}
WORKERS=${WORKERS:-1}
TARGET_CACHE_MB=${TARGET_CACHE_MB:-1}
MODES=${MODES:-"ram store store-source"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
mkdir -p "$RUNS"

echo "== stage 1: teacher features (rows shuffled, and in source order)" >&2
build_caches --order source
source_cache=$train_cache
build_caches
echo "== stage 2: the pca basis (coordinates stored) of each, fitted without the validation rows" >&2
shuffled_cache=$train_cache
train_cache=$source_cache fit_basis pca pca
train_cache=$shuffled_cache
fit_basis pca pca

echo "== stage 3: {$MODES} x labels {$LPCS} x seeds {$SEEDS}, $JOBS at a time" >&2
jobs_file=$(mktemp)
for lpc in $LPCS; do
  for seed in $SEEDS; do
    for mode in $MODES; do
      out="$RUNS/tcs-$mode-lpc$lpc-s$seed"
      [ -f "$out/final.json" ] && continue
      cache=$train_cache
      case $mode in
        ram) extra="--targets ram" ;;
        store) extra="--targets store --target-cache-mb $TARGET_CACHE_MB" ;;
        store-source) extra="--targets store --target-cache-mb $TARGET_CACHE_MB"; cache=$source_cache ;;
        store*) extra="--targets store --target-cache-mb ${mode#store}" ;;
        *) echo "unknown mode $mode (ram, store, store-source, storeN)" >&2; exit 2 ;;
      esac
      [ "$lpc" != all ] && extra="$extra --labels-per-class $lpc"
      echo "rm -rf $out && $TCSKD -q train --cache $cache --method tcs --basis pca --dim 64 --lambda 10 \
--tailor off --classify-from feature --elsh-bits 0 --student $STUDENT \
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
