#!/usr/bin/env bash
# The device check of issue #20, sized for a lent machine (one H100/H200, Python 3.12 with torch, numpy, tiktoken,
# tokenizers and cuda-bindings preinstalled, no Docker, no network, runs as root) and 10 minutes of it:
#   the gpu preset trains 60 s once cold (empty compile cache) and once warm (the cache the first run published),
#   through the real harness; the warm run's checkpoint is then scored through the old transport (memfd: logits
#   through host memory) and the new one (CUDA device memory, or the fallback it names and why), with the eval
#   split across two non-root uids (AUTORESEARCH_PRIVSEP 1001:1002, as in the container; needs root), on as many
#   val tokens as the carried slice holds, scaled to the production 40 x 2^19 (the count is printed); then the
#   probe's twin-pass drift of that model at the eval's precision. One table: bench/eval_transport.py.
# Data: DATA_DIR (a prepared folder with train/ and val/, <= 40 MB to travel with the tree), else the stdlib corpus
# prepared here (needs `tokenizers`, ~1 min). climbmix cannot be fetched there: on the stdlib corpus val_bpb
# measures the code path, not pretraining quality.
# The lent machine's torch (2.11) is not the image's pin: this check proves nothing about that build, nor about
# the hardened container (read-only root, uid 1001, Docker's NVIDIA runtime): `doctor --gpu` checks those.
# Usage: bash scripts/gpu_check.sh [--cpu-dry-run] [DATA_DIR]      (env: PYTHON, GPU_SECONDS, CHECK_TIMEOUT)
#   --cpu-dry-run: the same steps at tiny sizes on CPU (tiny preset, 20 s budgets, 16k eval tokens, memfd both
#   columns): proves the script end to end without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY=""
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY="--cpu-dry-run"; shift; fi
DATA_DIR=${1:-${DATA_DIR:-.work/bench/gpu-check-stdlib-8192}}
GPU_SECONDS=${GPU_SECONDS:-60}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-540}
export PYTHONPATH="$PWD"
started=$SECONDS

echo "=== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available())"
"$PYTHON" -c "import importlib.util as u; print('cuda-bindings:', 'present' if u.find_spec('cuda') and u.find_spec('cuda.bindings') else 'MISSING (the device transport will fall back to pinned host memory)')"
if [ -z "$DRY" ]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU (or --cpu-dry-run)')"
fi
if [ "$(id -u)" != 0 ]; then echo "not root: the eval runs unsplit (same uid); the split needs root"; fi

if [ ! -f "$DATA_DIR/train/meta.json" ]; then
    echo "=== preparing the stdlib corpus into $DATA_DIR (no carried data found)"
    "$PYTHON" -c "from trainer.prepare import prepare_data; prepare_data('stdlib', '$DATA_DIR', 8192)"
fi
echo "data: $DATA_DIR ($(du -sm "$DATA_DIR" | cut -f1) MB)"
# The model uid must read this package and the Python it runs: make the tree world-readable for the split.
if [ "$(id -u)" = 0 ]; then chmod -R a+rX "$PWD" 2>/dev/null || true; fi

echo "=== train cold + warm, eval old vs new transport, probe drift (limit ${CHECK_TIMEOUT} s)"
timeout "$CHECK_TIMEOUT" "$PYTHON" bench/eval_transport.py --data "$DATA_DIR" --seconds "$GPU_SECONDS" \
    --warm-seconds "$GPU_SECONDS" $DRY
echo "gpu_check done in $((SECONDS - started)) s"
