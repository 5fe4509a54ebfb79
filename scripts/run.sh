#!/usr/bin/env bash
# The main job: set up (first run only) and stream the embedded default model's answer to a prompt
# (sent as one chat message: the default model is an instruct model).
# Usage: bash scripts/run.sh ["prompt"] [llama-fast generate flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
prompt=${1:-"Write a short poem about the sea."}
shift || true
exec .venv/bin/llama-fast generate --chat "$prompt" "$@"
