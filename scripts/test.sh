#!/usr/bin/env bash
# The test suite: set up (first run only), run the GPU-free compile checks, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# GPU-free compile check of every Triton kernel configuration (sm_90 and sm_80): fails on a compile
# error, a register spill, shared memory over the limit, or attention without tensor cores. Results are
# cached per kernel source in .cache/, so an unchanged kernel set costs seconds.
.venv/bin/python scripts/check_triton_compile.py
# Run pytest through its console script, not `python -m pytest`: that would put the repository root on
# sys.path, where our kernels/ folder shadows the Hugging Face `kernels` package (DESIGN.md section 4).
exec .venv/bin/pytest "$@"
