#!/usr/bin/env bash
# The test suite: set up (first run only; the runtime packages plus the test stack, requirements-dev.txt),
# run the GPU-free compile checks, then pytest (arguments are pytest's).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --dev
# GPU-free compile check of every Triton kernel configuration (sm_90 and sm_80): fails on a compile
# error, a register spill, shared memory over the limit, or attention without tensor cores. Results are
# cached per kernel source in .cache/, so an unchanged kernel set costs seconds.
echo "[test] compile check of the Triton kernels (sm_90, sm_80; cached per kernel source)" >&2
.venv/bin/python scripts/check_triton_compile.py
# The CUDA sources (csrc/cuda/*.cu) must compile with nvcc for sm_80 and sm_90 (no GPU needed).
echo "[test] compile check of the CUDA sources with nvcc (where nvcc is installed)" >&2
bash scripts/check_cuda_compile.sh
# llama.cpp's tokenizer test vectors (tests/test_tokenizer.py): downloaded once into the cache, then a no-op.
# Without network the tokenizer tests that need them skip, saying why.
.venv/bin/python scripts/fetch_tokenizer_vectors.py >/dev/null || echo "note: llama.cpp's tokenizer vectors unavailable" >&2
# Run pytest through its console script, not `python -m pytest`: that would put the repository root on
# sys.path, where our kernels/ folder shadows the Hugging Face `kernels` package (docs/ARCHITECTURE.md section 4).
echo "[test] pytest $*" >&2
exec .venv/bin/pytest "$@"
