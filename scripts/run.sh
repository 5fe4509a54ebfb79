#!/usr/bin/env bash
# The main job: set up (first run only; the runtime packages, not the test stack) and stream the embedded
# default model's answer to a prompt, sent as one chat message (the default model is an instruct model).
# Like llama.cpp's command line it samples (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) and prints
# its seed to stderr; --seed N repeats a run, --temperature 0 makes it greedy.
# Usage: bash scripts/run.sh ["prompt" | -] [llama-fast generate flags...]   (- reads the prompt from stdin)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
prompt=${1:-"Write a short poem about the sea."}
shift || true
echo "[run] llama-fast generate --chat: the default model's reply (flags: llama-fast generate --help)" >&2
exec .venv/bin/llama-fast generate --chat "$prompt" "$@"
