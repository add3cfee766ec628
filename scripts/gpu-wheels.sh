#!/usr/bin/env bash
# Here, before scripts/gpu-carve-check.sh runs through the device tool: the carve's packages that the
# GPU machine's image lacks (pydantic and its own needs, typing-extensions at the version they need;
# /work/.library/device/KINDS.md lists the image), as wheels for its Python 3.12 into .whl/ (ignored
# by git; the tool's `carry` takes it there).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    typing-extensions==4.16.0
ls .whl
