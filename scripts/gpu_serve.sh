#!/usr/bin/env bash
# One command on a GPU host without network: install (scripts/gpu_install.sh), then
# `python3 -m sgl_slim.launch "$@"` with the GPU stand-ins. Example:
#   scripts/gpu_serve.sh --model-path /models/llama --s2o --port 30000
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
site="$("$root/scripts/gpu_install.sh")"
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "${PYTHON:-python3}" -m sgl_slim.launch "$@"
