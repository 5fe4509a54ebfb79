#!/usr/bin/env bash
# The test suite: set up (first run only), run the GPU-free compile checks, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The CUDA sources must compile for sm_80 and sm_90 (nvcc, no GPU needed).
bash scripts/check_cuda_compile.sh
# Run pytest through its console script, not `python -m pytest`: that would put the repository root on
# sys.path, where our kernels/ folder shadows the Hugging Face `kernels` package (DESIGN.md section 4).
exec .venv/bin/pytest "$@"
