#!/usr/bin/env bash
# The test suite: set up (first run only), run the GPU-free compile checks, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Run pytest through its console script, not `python -m pytest`: that would put the repository root on
# sys.path, where our kernels/ folder shadows the Hugging Face `kernels` package (DESIGN.md section 4).
exec .venv/bin/pytest "$@"
