#!/usr/bin/env bash
# The kernel checks still owed on a GPU (docs/kernels.md), as one command that fits a device
# session: the GPU tests, the dense path's tile sweep, and the FFN benchmark at the batches where
# `auto` takes the dense path. Each step has its own time limit and writes as it goes, so a step
# cut short still leaves what it finished. Run from the repository root on the GPU machine:
#
#   bash scripts/gpu-check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else results/kernels/gpu-check
#
# About 8 minutes at most (the limits below). Uses the machine's own torch/triton/transformers.
set -uo pipefail
out="${1:-${OUT:-results/kernels/gpu-check}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton",
triton.__version__, "transformers", transformers.__version__)'
    git rev-parse --short HEAD 2>/dev/null || true
} >"$out/env.txt" 2>&1

# 1. Every kernel against the reference on CUDA (decode, grouped, dense; fp32/bf16/fp16; 7B shapes).
timeout 150 python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider 2>&1 | tail -40 >"$out/pytest_gpu.log"
echo "pytest -m gpu: exit ${PIPESTATUS[0]}" >>"$out/pytest_gpu.log"

# 2. The dense path's tiles (never swept): S2A2E16 at intermediate 11008, the batches auto sends to it.
# Largest batches first: the dense path is all `auto` runs there.
timeout 150 python3 benchmarks/ffn_kernels.py --tune --paths dense --configs S2A2E16 --intermediate 11008 \
    --batches 256 64 32 16 --reps 20 --out "$out" >"$out/tune.log" 2>&1
echo "tune: exit $?" >>"$out/tune.log"

# 3. Dense path and auto against the dense FFN at 16-256 tokens (the "never 5% slower" goal).
timeout 180 python3 benchmarks/ffn_kernels.py --intermediate 11008 --batches 16 32 64 256 --out "$out" \
    >"$out/ffn.log" 2>&1
echo "ffn_kernels: exit $?" >>"$out/ffn.log"
ls -la "$out"
