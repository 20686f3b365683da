#!/usr/bin/env bash
# One-GPU check of crsam's training step (see benchmarks/gpu_check.py): ResNet-18 steps of SGD,
# SAM and CR-SAM in bf16 with time ratios against SGD and peak memory. The timed steps get a
# budget of 150 s and the whole check is stopped at 235 s, so it ends within 4 minutes. Without
# CUDA it runs a 5-step CPU smoke version. Extra arguments go to gpu_check.py.
#
#   PYTHON=/path/to/python benchmarks/gpu_check.sh [--steps 300] [--batch-size 128] [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's .venv when there is one (as make creates it), else python3 on the PATH.
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 235 "$PYTHON" benchmarks/gpu_check.py --max-seconds 150 "$@"
