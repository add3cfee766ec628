#!/usr/bin/env bash
# The kernel checks still owed on a GPU (docs/kernels.md), as one command that fits a device
# session, most important first: the GPU tests; the router alone (split over H since the last GPU
# run); the FFN benchmark at batch 1 (the whole block, router included) and at the batches where
# `auto` takes the dense path; end-to-end decode at batch 1; then, with the time left, the dense
# path's tile sweep. Each step has its own time limit, all of them together at most 9.5 minutes,
# and each writes as it goes, so a step cut short still leaves what it finished. From the
# repository root on the GPU machine:
#
#   bash scripts/gpu-check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else results/kernels/gpu-check
#
# Uses the machine's own torch/triton/transformers.
set -uo pipefail
out="${1:-${OUT:-results/kernels/gpu-check}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deadline=$((SECONDS + 570))

# step LIMIT LOG CMD...: run CMD for at most LIMIT seconds, and never past the deadline.
step() {
    local limit=$1 log=$2 left=$((deadline - SECONDS))
    shift 2
    ((left < limit)) && limit=$left  # the kill grace (10 s) is inside the 30 s margin below 600 s
    if ((limit < 10)); then
        echo "skipped: no time left" >"$log"
        return
    fi
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    echo "exit $? (limit ${limit}s): $*" >>"$log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton",
triton.__version__, "transformers", transformers.__version__)'
    git rev-parse --short HEAD 2>/dev/null || true
} >"$out/env.txt" 2>&1

# 1. Every kernel against the reference on CUDA (decode, grouped, dense, router; fp32/bf16/fp16; 7B shapes).
step 150 "$out/pytest_gpu.log" python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider
# 2. The router alone: split over H (as enable runs it) vs one program per token vs transformers',
#    16 and 32 H steps per token in the old schedule.
step 90 "$out/router.log" python3 benchmarks/ffn_kernels.py --router --configs S2A2E16 S2A4E32 --batches 1 64 \
    --reps 20 --out "$out"
# 3. Batch 1 (the block with the new router) and 16-256 tokens (the dense path, "never 5% slower").
step 200 "$out/ffn.log" python3 benchmarks/ffn_kernels.py --intermediate 11008 --batches 1 16 32 64 256 --out "$out"
# 4. End-to-end greedy decode at batch 1 and 2 (the 1.3x goal), S2A2E16.
step 120 "$out/decode_e2e.log" python3 benchmarks/decode_e2e.py --device cuda --batches 1 2 --eager-batches --out "$out"
# 5. The dense path's tiles (never swept), largest batches first, with what time is left.
step 150 "$out/tune.log" python3 benchmarks/ffn_kernels.py --tune --paths dense --configs S2A2E16 \
    --intermediate 11008 --batches 256 64 32 16 --reps 20 --out "$out"
ls -la "$out"
