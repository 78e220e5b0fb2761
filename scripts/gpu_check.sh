#!/usr/bin/env bash
# The GPU check of issue #12, for a machine with one NVIDIA GPU and no Docker (e.g. the lent H200: Python
# 3.12 + torch preinstalled, no network). It runs the trainer through the harness directly, train stage then
# eval stage, twice:
#   1. smoke (`doctor --gpu` equivalent): tiny preset on the CUDA path (bf16, torch.compile, flex attention,
#      export, eval on the device), 10 s of training;
#   2. the gpu preset (~50 M params, 2^19 tokens/step) for GPU_SECONDS (default 120 s).
# Each prints tokens/s, MFU, steps, val_bpb, warm-up (compile) seconds cold and warm, stage seconds, peak
# memory and experiments/hour (bench/trainer_bench.py).
# Data: DATA_DIR (a prepared folder with train/ and val/, carried along), else the stdlib corpus prepared here
# (needs `tokenizers`). Note: the stdlib corpus holds ~4 M train tokens, so a 120 s gpu run passes over it many
# times; its val_bpb measures the code path, not pretraining quality.
# Usage: bash scripts/gpu_check.sh [DATA_DIR]      (env: GPU_SECONDS, EVAL_TOKENS, PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA_DIR=${1:-${DATA_DIR:-.work/bench/stdlib-8192}}
GPU_SECONDS=${GPU_SECONDS:-120}
EVAL_TOKENS=${EVAL_TOKENS:-4194304}
export PYTHONPATH="$PWD"

echo "=== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available())"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"

if [ ! -f "$DATA_DIR/train/meta.json" ]; then
    echo "=== preparing the stdlib corpus into $DATA_DIR (no carried data found)"
    "$PYTHON" -c "from trainer.prepare import prepare_data; prepare_data('stdlib', '$DATA_DIR', 8192)"
fi

echo "=== 1. smoke: tiny preset on the CUDA path (train stage, eval stage)"
"$PYTHON" bench/trainer_bench.py --preset tiny --seconds 10 --warm-seconds 5 --eval-tokens 65536 --data "$DATA_DIR" --quiet

echo "=== 2. gpu preset, ${GPU_SECONDS} s of training, ${EVAL_TOKENS} eval tokens"
"$PYTHON" bench/trainer_bench.py --preset gpu --seconds "$GPU_SECONDS" --warm-seconds 10 --eval-tokens "$EVAL_TOKENS" \
    --data "$DATA_DIR"
