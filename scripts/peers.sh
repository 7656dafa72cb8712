#!/usr/bin/env bash
# Side by side with independently written distillation code on the built-in default's job: tcskd's ce, fitnet
# and tcs from the cache, and the same job trained by torchdistill and timm (tcskd.bench.peers: online FitNet,
# the teacher seeing the student's augmented view every step, and CE-only in each framework's loop), and the
# traditional pipeline (the teacher fine-tuned on the run's labelled rows, python -m tcskd.bench.peers.finetune,
# then torchdistill's KD, CRD and RKD from it), at each label budget and seed; a control without augmentation (tcskd online with the identity basis against both
# peers' FitNet: one objective, so they must agree within noise); the cost of tcskd cache + basis measured once
# on an empty cache root (pipeline.json); the report with the cost columns and the claims table.
# Every run holds out the same validation rows, the test split is scored once per run, and every option that
# defines a row is pinned below (tcskd train's and the peers' defaults may change).
# Driven by `make peers`; resumable (finished runs are skipped); every knob is an environment variable.
# Needs the peers extra: pip install 'tcskd[peers]' (make install has it).
set -euo pipefail
source "$(dirname "$0")/common.sh"
PYTHON=${PYTHON:-$(dirname "$(command -v "$TCSKD")")/python}
RUNS=${RUNS:-runs/peers}
CONTROL_LPCS=${CONTROL_LPCS:-10}   # the control's label budgets ("" for none)
JOBS=${JOBS:-1}                    # runs side by side (1: the timings are not shared with another run)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
WORKERS=${WORKERS:-0}
start=$(date +%s)

# The options tcskd train and the peer arms share (same names), pinned.
COMMON="--student $STUDENT --epochs $EPOCHS --batch-size 128 --optimizer sgd --lr 0.05 --weight-decay 5e-4 \
--momentum 0.9 --warmup-epochs 1 --schedule cosine --val-frac 0.1 --val-seed 0 --target-norm global \
--image-size 28 --device $DEVICE --workers $WORKERS"
FIXED="--tailor off --elsh-bits 0 --classify-from feature --mimic mse"
# name | runner (tcskd: tcskd train; peer: python -m tcskd.bench.peers) | its options besides COMMON
ARMS=(
  "ce|tcskd|--method ce --lambda 0 --augment auto $FIXED"
  "fitnet|tcskd|--method fitnet --lambda 10 --augment auto $FIXED"
  "tcs|tcskd|--method tcs --basis pca --dim 64 --lambda 10 --augment auto $FIXED"
  "torchdistill-ce|peer|--arm torchdistill-ce --lambda 0 --augment auto"
  "timm-ce|peer|--arm timm-ce --lambda 0 --augment auto"
  "torchdistill-fitnet|peer|--arm torchdistill-fitnet --lambda 10 --augment auto"
  "timm-fitnet|peer|--arm timm-fitnet --lambda 10 --augment auto"
)
# The traditional pipeline: one fine-tuned teacher per budget and seed ($RUNS/finetune-lpcL-sS), then each arm.
TRADITIONAL=(
  "torchdistill-kd|trad|--arm torchdistill-kd --lambda 0 --augment auto"
  "torchdistill-crd|trad|--arm torchdistill-crd --lambda 0 --augment auto"
  "torchdistill-rkd|trad|--arm torchdistill-rkd --lambda 0 --augment auto"
)
TRADITIONAL_LPCS=${TRADITIONAL_LPCS:-$LPCS}
# Fine-tuning: BiT-HyperRule's small-data schedule (the finetune command's defaults, pinned here).
FINETUNE="--steps 500 --batch-size 512 --lr 0.003 --momentum 0.9 --weight-decay 0 --warmup-steps 100 \
--milestones 200,300,400 --gamma 0.1 --val-frac 0.1 --val-seed 0 --augment auto --image-size 28 --device $DEVICE \
--workers $WORKERS"
CONTROL=(
  "control-online|tcskd|--method online --basis identity --lambda 10 --augment none $FIXED"
  "control-torchdistill-fitnet|peer|--arm torchdistill-fitnet --lambda 10 --augment none"
  "control-timm-fitnet|peer|--arm timm-fitnet --lambda 10 --augment none"
)

# One run's command: the runner, COMMON, the arm's options, the budget, seed and run directory.
command_of() {  # entry lpc seed out
  local name=${1%%|*} rest=${1#*|} runner opts budget=""
  runner=${rest%%|*}
  opts=${rest#*|}
  [ "$2" != all ] && budget="--labels-per-class $2"
  if [ "$runner" = tcskd ]; then
    echo "$TCSKD -q train --cache $train_cache $COMMON $opts $budget --seed $3 --out $4"
  elif [ "$runner" = trad ]; then
    echo "$PYTHON -m tcskd.bench.peers --cache $train_cache $COMMON $opts $budget --seed $3 --out $4 \
--teacher-ckpt $RUNS/finetune-lpc$2-s$3/teacher.pt"
  else
    echo "$PYTHON -m tcskd.bench.peers --cache $train_cache $COMMON $opts $budget --seed $3 --out $4"
  fi
}

finetune_of() {  # lpc seed: the teacher's fine-tuning on the run's labelled rows
  local budget=""
  [ "$1" != all ] && budget="--labels-per-class $1"
  echo "$PYTHON -m tcskd.bench.peers.finetune --cache $train_cache $FINETUNE $budget --seed $2 \
--out $RUNS/finetune-lpc$1-s$2"
}

if [ "${1:-}" = --print ]; then  # the commands, one per run (no cache is built, nothing is trained)
  train_cache=TRAIN_CACHE
  for entry in "${ARMS[@]}"; do for lpc in $LPCS; do
    command_of "$entry" "$lpc" SEED "$RUNS/${entry%%|*}-lpc$lpc-sSEED"; done; done
  for entry in "${CONTROL[@]}"; do for lpc in $CONTROL_LPCS; do
    command_of "$entry" "$lpc" SEED "$RUNS/${entry%%|*}-lpc$lpc-sSEED"; done; done
  for lpc in $TRADITIONAL_LPCS; do finetune_of "$lpc" SEED; done
  for entry in "${TRADITIONAL[@]}"; do for lpc in $TRADITIONAL_LPCS; do
    command_of "$entry" "$lpc" SEED "$RUNS/${entry%%|*}-lpc$lpc-sSEED"; done; done
  exit 0
fi
"$PYTHON" -c "import torchdistill, timm" 2>/dev/null || {
  echo "peers: torchdistill and timm are needed: pip install 'tcskd[peers]'" >&2; exit 2; }
mkdir -p "$RUNS"

echo "== stage 1 and 2 timed once on an empty cache root: $RUNS/pipeline.json" >&2
if [ ! -f "$RUNS/pipeline.json" ]; then
  timed_root="$RUNS/pipeline-caches"
  rm -rf "$timed_root"
  t0=$(date +%s.%N)
  key=$(TCSKD_CACHE=$timed_root $TCSKD -q cache --data builtin:mnist5k --teacher builtin:efficientnet-lite0 \
        --image-size "$IMAGE_SIZE" --device "$DEVICE" --split train | tail -n1)
  t1=$(date +%s.%N)
  TCSKD_CACHE=$timed_root $TCSKD -q basis --cache "$key" --name pca --kind pca --dim 256 --coords --exclude-val \
    --device "$DEVICE" >/dev/null
  t2=$(date +%s.%N)
  rm -rf "$timed_root"
  "$PYTHON" -c "import json, sys, platform, os; json.dump({'cache_seconds': $t1 - $t0, 'basis_seconds': $t2 - $t1,
'what': 'tcskd cache (train split) and tcskd basis (pca, 256) on an empty cache root', 'threads': os.environ.get('OMP_NUM_THREADS'),
'machine': platform.processor() or platform.machine(), 'cores': os.cpu_count()}, open('$RUNS/pipeline.json', 'w'), indent=1)"
fi

echo "== the shared caches and bases" >&2
build_caches
fit_basis pca pca
$TCSKD -q basis --cache "$train_cache" --name identity --kind identity --exclude-val --device "$DEVICE"
teacher_evals

jobs_file=$(mktemp)
trap 'rm -f "$jobs_file"' EXIT
add_runs() {  # entry lpcs
  local entry=$1 name=${1%%|*} lpc seed out
  wanted "$name" || return 0
  for lpc in $2; do
    for seed in $SEEDS; do
      out="$RUNS/$name-lpc$lpc-s$seed"
      [ -f "$out/final.json" ] && continue
      echo "rm -rf $out && $(command_of "$entry" "$lpc" "$seed" "$out") >/dev/null && echo trained $out >&2" \
        >> "$jobs_file"
    done
  done
}
for entry in "${ARMS[@]}"; do add_runs "$entry" "$LPCS"; done
for entry in "${CONTROL[@]}"; do add_runs "$entry" "$CONTROL_LPCS"; done
echo "== $(wc -l < "$jobs_file") runs to train, $JOBS at a time" >&2
xargs -a "$jobs_file" -d '\n' -P "$JOBS" -I{} bash -c '{}'

if wanted finetune || wanted torchdistill-kd || wanted torchdistill-crd || wanted torchdistill-rkd; then
  echo "== the traditional pipeline: the teacher fine-tuned per budget and seed, then KD, CRD, RKD" >&2
  : > "$jobs_file"
  for lpc in $TRADITIONAL_LPCS; do
    for seed in $SEEDS; do
      out="$RUNS/finetune-lpc$lpc-s$seed"
      [ -f "$out/finetune.json" ] && continue
      echo "rm -rf $out && $(finetune_of "$lpc" "$seed") >/dev/null && echo fine-tuned $out >&2" >> "$jobs_file"
    done
  done
  xargs -a "$jobs_file" -d '\n' -P "$JOBS" -I{} bash -c '{}'
  : > "$jobs_file"
  for entry in "${TRADITIONAL[@]}"; do add_runs "$entry" "$TRADITIONAL_LPCS"; done
  xargs -a "$jobs_file" -d '\n' -P "$JOBS" -I{} bash -c '{}'
fi

echo "== report" >&2
report --cost  # the fine-tuning folders hold no final.json: tcskd report passes over them
"$PYTHON" -m tcskd.bench.peers.claims "$RUNS" | tee "$RUNS/claims.md"
echo "peers finished in $(( $(date +%s) - start )) s; report: $RUNS/report.md, claims: $RUNS/claims.md" >&2
