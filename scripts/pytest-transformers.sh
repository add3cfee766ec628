#!/usr/bin/env bash
# Run tests under another transformers release than the installed one, without touching the
# environment: the release (and the hub client it needs) is unpacked into a cache directory that
# goes first on PYTHONPATH. For the GPU machine's 5.17:
#
#   bash scripts/pytest-transformers.sh 5.17.0 tests/kernels/test_integration.py tests/eval/test_load_speed.py
#
# Needs the package index (pip download); everything else comes from the installed environment.
set -euo pipefail
version=$1
shift
dir="${XDG_CACHE_HOME:-$HOME/.cache}/moecarve/transformers-$version"
if [[ ! -d "$dir/transformers" ]]; then
    wheels=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$wheels" "transformers==$version"
    # the hub client that release asks for (5.17: below 2, which imports httpx)
    hub=$(python3 -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
print(next(line.split(": ", 1)[1].split(";")[0].replace(" ", "") for line in z.read(meta).decode().splitlines()
           if line.startswith("Requires-Dist: huggingface-hub")))' "$wheels"/transformers-*.whl)
    python3 -m pip download -q --no-deps -d "$wheels" "$hub" httpx httpcore h11
    mkdir -p "$dir.partial"
    for wheel in "$wheels"/*.whl; do
        python3 -m zipfile -e "$wheel" "$dir.partial"
    done
    rm -rf "$wheels" "$dir"
    mv "$dir.partial" "$dir"
fi
PYTHONPATH="$dir:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
    'import transformers, sys; print("transformers", transformers.__version__, file=sys.stderr)'
PYTHONPATH="$dir:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m pytest -p no:cacheprovider "$@"
