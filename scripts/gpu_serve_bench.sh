#!/usr/bin/env bash
# One command on a GPU host without network: install (scripts/gpu_install.sh), then measure S2O's and stock
# SGLang's time to first token (benchmarks/serving_gpu.py). Usage:
#   scripts/gpu_serve_bench.sh OUT_DIR [benchmarks.serving_gpu flags, e.g. --layers 4 --configs stock,s2o]
# OUT_DIR receives serving_gpu_s2o.jsonl and the servers' logs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$1"
shift
mkdir -p "$out"
source "$root/scripts/gpu_env.sh" gpu_serve_bench
"$py" -m benchmarks.serving_gpu --out "$out/serving_gpu_s2o.jsonl" --logs "$out" "$@"
