# Sourced by scripts/grid.sh, scripts/peers.sh and scripts/store_vs_ram.sh: their shared knobs and steps on the
# built-in default (scripts/demo.sh runs recipes/default.yaml). Expects RUNS; sets train_cache and test_cache.

# The knobs the scripts share, each an environment variable (these are its defaults).
TCSKD=${TCSKD:-tcskd}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-15}
IMAGE_SIZE=${IMAGE_SIZE:-112}
DEVICE=${DEVICE:-auto}
STUDENT=${STUDENT:-cnn}
LPCS=${LPCS:-"10 all"}
ONLY=${ONLY:-}          # a space-separated subset of the script's configuration names

# Whether configuration NAME is to run (every one without ONLY).
wanted() {
  [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]
}

# Stage 1: the train and test caches (a cache hit when they exist); rows in tcskd cache's default --order.
# Extra arguments go to both `tcskd cache` calls (e.g. --order source).
build_caches() {
  local opts=(--data builtin:mnist5k --teacher builtin:efficientnet-lite0 --image-size "$IMAGE_SIZE"
              --device "$DEVICE" "$@")
  train_cache=$($TCSKD cache "${opts[@]}" --split train | tail -n1)
  test_cache=$($TCSKD cache "${opts[@]}" --split test | tail -n1)
}

# Stage 2: basis NAME of KIND (256 coordinates stored), fitted without the validation rows.
fit_basis() {
  $TCSKD -q basis --cache "$train_cache" --name "$1" --kind "$2" --dim 256 --coords --exclude-val \
    --device "$DEVICE"
}

# The teacher's reference from cached features at each label budget of LPCS (every seed of SEEDS for a
# budget; one for all labels, where the seed changes nothing but the probe's start).
teacher_evals() {
  local lpc seed seeds f args
  for lpc in $LPCS; do
    seeds=$SEEDS
    [ "$lpc" = all ] && seeds=${SEEDS%% *}
    for seed in $seeds; do
      f="$RUNS/teacher-lpc$lpc-s$seed.json"
      [ -f "$f" ] && continue
      args=(--cache "$train_cache" --test-cache "$test_cache" --device "$DEVICE" --seed "$seed" --out "$f")
      [ "$lpc" != all ] && args+=(--labels-per-class "$lpc")
      $TCSKD -q eval "${args[@]}" >/dev/null
    done
  done
}

# The comparison report of every run in RUNS, with the teacher lines (extra arguments go to tcskd report).
report() {
  $TCSKD report "$RUNS"/*-lpc*/ $(for f in "$RUNS"/teacher-lpc*.json; do echo --teacher-eval "$f"; done) \
    --png "$RUNS/report.png" "$@" | tee "$RUNS/report.md"
}
