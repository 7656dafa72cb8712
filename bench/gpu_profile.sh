#!/usr/bin/env bash
# The GPU profile of `tcskd bench`, in one run (about 3-4 minutes; hard limit 345 s for the benchmark).
#
#   OUT=/some/folder bash bench/gpu_profile.sh        # from the repository root (or anywhere)
#
# Teachers: DINOv2-architecture ViT-S/14, ViT-B/14, ViT-L/14 at 224 px with random weights, written with
# transformers into a temporary folder (throughput does not depend on the weights). Data: 16,384 synthetic
# CIFAR-like 32x32x3 images (npz), upscaled to 224 px by the cache stage. Student: resnet32x4 at 32 px,
# batch 512, for ce / tcs / online (ViT-S teacher in the loop).
#
# Writes $OUT/bench-gpu.json, $OUT/bench-gpu.md (the table), $OUT/bench-gpu.log (stderr), and copies
# named after the device and date ($OUT/<device>-<date>.json/.md) to commit under bench/results/.
# The JSON is rewritten after every section: a run cut short keeps what it measured.
#
# Needs: torch (CUDA), numpy, zarr, numcodecs, h5py, click, tqdm, pyyaml, transformers, safetensors;
# matplotlib is optional (without it the basis stage's scree plot is skipped). faiss is not used.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-bench/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF' || exit 2
import importlib.util, sys
need = ["torch", "numpy", "zarr", "numcodecs", "h5py", "click", "tqdm", "yaml", "transformers", "safetensors"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_profile: missing Python packages: {', '.join(missing)} (install their wheels first)")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_profile: torch sees no CUDA device")
print(f"gpu_profile: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, python {sys.version.split()[0]}")
if importlib.util.find_spec("matplotlib") is None:
    print("gpu_profile: matplotlib missing: the basis figures will not include the scree plot")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
# DataLoader workers pass batches through /dev/shm (the cache stage: 256 x 3 x 224 x 224 float32 per batch).
shm_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
WORKER_OPTS=()
if [ -n "${shm_kb:-}" ] && [ "$shm_kb" -lt 4000000 ]; then
  echo "gpu_profile: /dev/shm has only $((shm_kb / 1024)) MiB free: DataLoader workers off (figures will be input-bound)"
  WORKER_OPTS=(--cache-workers 0 --train-workers 0)
fi

if "$PY" -m tcskd bench --help >/dev/null 2>&1; then
  CMD=("$PY" -m tcskd bench)
else  # bench not registered in the CLI yet
  CMD=("$PY" -m tcskd.bench)
fi
start=$(date +%s)
timeout --signal=INT --kill-after=10 345 "${CMD[@]}" --device cuda --out "$OUT/bench-gpu.json" ${WORKER_OPTS[@]+"${WORKER_OPTS[@]}"} \
  "$@" 2> >(tee "$OUT/bench-gpu.log" >&2)
rc=$?
echo "gpu_profile: exit $rc after $(( $(date +%s) - start )) s"

# Copies named after the device and the date, for bench/results/.
"$PY" - "$OUT/bench-gpu.json" <<'EOF' || true
import json, re, shutil, sys
from pathlib import Path
src = Path(sys.argv[1])
if src.exists():
    env = json.loads(src.read_text())["environment"]
    name = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-") + "-" + env["date"][:10]
    for ext in (".json", ".md"):
        if src.with_suffix(ext).exists():
            shutil.copy(src.with_suffix(ext), src.with_name(name + ext))
    print(f"gpu_profile: copies as {src.with_name(name)}.json/.md")
EOF
exit $rc
