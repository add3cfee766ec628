#!/usr/bin/env bash
# The carve on a GPU (docs/carve.md, "On a GPU"), as one command sized for a device session: the
# gpu-marked carve tests (exact with every expert active, deterministic, the CPU's carve up to
# rounding) and training-device tests (recovery and ESFT on one GPU, docs/tune.md), then two Llama-2-7B-shaped layers carved at the default 16,384 calibration tokens on
# the GPU and, in the same call, on the machine's 16 CPU cores, for the ratio. Each step has its own
# time limit (a carve writes its JSON when it ends: one cut short leaves its log lines). The GPU image lacks pydantic, so first, here:
#
#   bash scripts/gpu-wheels.sh                 # the wheels into .whl/ (ignored by git)
#
# then through the device tool, with carry [".whl"] and timeout_s 420:
#
#   bash scripts/gpu-carve-check.sh "$OUT"     # OUT_DIR defaults to $OUT, else results/carve/gpu-check
#
# OUT_DIR gets gpu-carve-check.log (versions, every step's output) and the two JSON files. Prints
# the steps' exit lines and exits with the worst step's status (124: a step hit its limit).
set -uo pipefail
out="${1:-${OUT:-results/carve/gpu-check}}"
mkdir -p "$out"
log="$out/gpu-carve-check.log"
: >"$log"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$log" 2>&1 || { cat "$log"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
worst=0

step() {
    local limit=$1 status
    shift
    echo "=== $* (limit ${limit}s)" >>"$log"
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    status=$?
    echo "=== exit $status" >>"$log"
    ((status > worst)) && worst=$status
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, transformers, pydantic; print("torch", torch.__version__, "transformers",
transformers.__version__, "pydantic", pydantic.__version__)'
    echo "commit ${MOECARVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} >>"$log" 2>&1

step 120 python3 -m pytest -m gpu tests/carve tests/esft/test_training_device.py -v -rfE -p no:cacheprovider
step 100 python3 benchmarks/carve_streaming.py --hidden 4096 --intermediate 11008 --layers 2 --heads 32 \
    --kv-heads 32 --calib-tokens 16384 --synthetic-text --device cuda --threads 16 \
    --out "$out/scale_7b_layers_cuda.json"
step 140 python3 benchmarks/carve_streaming.py --hidden 4096 --intermediate 11008 --layers 2 --heads 32 \
    --kv-heads 32 --calib-tokens 16384 --synthetic-text --device cpu --threads 16 \
    --out "$out/scale_7b_layers_cpu16.json"
ls -la "$out" >>"$log"
grep '^=== ' "$log"
exit "$worst"
