#!/usr/bin/env bash
# The kernel checks still owed on a GPU (docs/kernels.md), as one command sized to a device session
# (15 minutes, a machine's start included). Most important first: the kernels at 7B shapes on CUDA;
# the router alone (split over H since the last GPU run); the FFN benchmark at batch 1 (the whole
# block, router included); end-to-end decode at batch 1, then each model's decode step split into
# kernels; the fastest path per batch against the dense FFN, 1 to 4096 tokens (the dense path where
# `auto` takes it); end-to-end decode at batch 1 again with both models' steps compiled by inductor
# (new); the block's kernels' device times at batch 1 and 8 (where the gap to the bytes ideal goes);
# the decode tiles at batch 1 (16-row and 512-column up tiles are new); the model compiled with CUDA
# graphs (new); every kernel against the reference on the edge-case table; then the dense path's
# tile sweep with what time is left. Each step has its own time limit and none runs past the
# deadline (360 s unless given); each writes as it goes, so a step cut short still leaves what it
# finished. From the repository root on the GPU machine:
#
#   MOECARVE_COMMIT=<commit> bash scripts/gpu-check.sh [OUT_DIR [SECONDS [FIRST_STEP]]]
#
# OUT_DIR defaults to $OUT, else results/kernels/gpu-check. FIRST_STEP (default 1) lets a second
# call go on where the first stopped (the log's "=== step N" lines say where). MOECARVE_COMMIT is
# recorded in every benchmark row (the device machine gets the working tree without .git). The
# pytest steps run on 8 workers where pytest-xdist is installed (Triton's compiles are CPU-bound),
# verbosely, so a step cut short still names what passed and failed. Prints the steps' exit lines
# and exits with the worst step's status (124: a step hit its limit or was skipped for lack of time).
#
# OUT_DIR gets up to seven files (the device tool brings back at most eight): gpu-check.log (versions
# and every step's output), the benchmarks' router / ffn_kernels / profile / decode_e2e / tune .jsonl rows,
# and step 5's tuned table (E14-I688-SI1376-H4096-K2-bfloat16.json) if that step finishes.
# Uses the machine's own torch/triton/transformers.
set -uo pipefail
out="${1:-${OUT:-results/kernels/gpu-check}}"
deadline=$((SECONDS + ${2:-360}))
first=${3:-1}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$out/gpu-check.log"
((first > 1)) || : >"$log"  # a second call (FIRST_STEP > 1) appends to the first's log
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the kernels compile for the GPU, not the interpreter
python3 -c 'import xdist' 2>/dev/null && export PYTEST_ADDOPTS="-n 8"
number=0 worst=0

# step LIMIT CMD...: run CMD for at most LIMIT seconds and never past the deadline, its output
# appended to the log; then copy the rows written so far (not the .csv copies) to OUT_DIR.
step() {
    local limit=$1 left=$((deadline - SECONDS)) status
    shift
    number=$((number + 1))
    ((number < first)) && return
    ((left < limit)) && limit=$left
    echo "=== step $number: $* (limit ${limit}s)" >>"$log"
    if ((limit < 10)); then
        echo "=== step $number skipped: no time left" >>"$log"
        ((worst < 124)) && worst=124
        return
    fi
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    status=$?
    echo "=== step $number exit $status" >>"$log"
    ((status > worst)) && worst=$status
    cp "$work"/*.jsonl "$out"/ 2>/dev/null
}

((first > 1)) && cp "$out"/*.jsonl "$work"/ 2>/dev/null  # a second call adds to the first's rows
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton",
triton.__version__, "transformers", transformers.__version__)'
    echo "commit ${MOECARVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} >>"$log" 2>&1

# 1. The kernels at 7B shapes and the tiny model's logits on CUDA (about 75 compiles).
step 75 python3 -m pytest -m gpu tests/kernels -v -rfE -p no:cacheprovider -k "7b or tiny_model"
# 2. The router alone: split over H (as enable runs it) vs one program per token vs transformers',
#    16 and 32 H steps per token in the old schedule.
step 45 python3 benchmarks/ffn_kernels.py --router --configs S2A2E16 S2A4E32 --batches 1 64 --reps 20 --out "$work"
# 3. Batch 1, every config: the kernels and the whole block with the new router (the batches where
#    `auto` takes the dense path are step 5's).
step 75 python3 benchmarks/ffn_kernels.py --intermediate 11008 --batches 1 --out "$work"
# 4. End-to-end greedy decode at batch 1 (the 1.3x goal), S2A2E16, then each model's decode step
#    split into its kernels.
step 90 python3 benchmarks/decode_e2e.py --device cuda --batches 1 --eager-batches --profile --out "$work"
# 5. The fastest path per batch from 1 to 4096 tokens against the dense FFN, built-in tiles (the
#    tuner `moecarve kernels tune --quick` runs): "never 5% slower" at every size, prefill included.
step 120 python3 benchmarks/ffn_kernels.py --tune --quick --configs S2A2E16 --intermediate 11008 \
    --batches 1 2 4 8 16 32 64 256 1024 4096 --reps 20 --table-out "$work/tables" --out "$work"
cp "$work"/tables/*/*.json "$out"/ 2>/dev/null
# 6. End-to-end decode at batch 1 with each model's decode step compiled first: inductor fuses the
#    norms, rotary and the dense SiLU*up. In the H100 run an uncompiled dense step took 8.2 ms, of
#    which its 32 FFNs 3.5 ms (decode_e2e.jsonl, ffn_kernels.jsonl): the rest, the same in the carve,
#    dilutes its FFN speedup. The dense model and ours only: each 32-layer compile takes a while.
step 180 python3 benchmarks/decode_e2e.py --device cuda --batches 1 --compile --models moecarve --out "$work"
# 7. The block's time split into its kernels' device times (router, up, down, glue) beside its graph
#    time, and the dense FFN's, at batch 1 and 8 (the decode kernels; `auto` takes the dense path at 16).
step 45 python3 benchmarks/ffn_kernels.py --profile --intermediate 11008 --configs S2A2E16 S2A4E32 \
    --batches 1 8 --reps 20 --out "$work"
# 8. The decode tiles at batch 1 (new up tiles: 16 rows, twice the programs of the tuned 32; 512 columns of H).
step 60 python3 benchmarks/ffn_kernels.py --tune --paths decode --configs S2A2E16 --intermediate 11008 \
    --batches 1 --reps 20 --out "$work"
# 9. The model compiled with inductor's CUDA graphs (`torch.compile(mode="reduce-overhead")`), new.
step 90 python3 -m pytest -m gpu tests/kernels -v -rfE -p no:cacheprovider -k "cuda_graphs"
# 10. Every kernel against the reference on the edge-case table (decode, grouped, dense, router;
#     fp32/bf16/fp16; about 240 compiles); the compiled model was step 9.
step 150 python3 -m pytest -m gpu tests/kernels -v -rfE -p no:cacheprovider -k "match_reference"
# 11. The dense path's tiles (never swept), with what time is left: 16 tokens first, where `auto`
#     first takes that path and its default tiles leave half the SMs without a program.
step 150 python3 benchmarks/ffn_kernels.py --tune --paths dense --configs S2A2E16 --intermediate 11008 \
    --batches 16 64 256 --reps 20 --out "$work"
ls -la "$out" >>"$log"
grep '^=== step' "$log"
exit "$worst"
