#!/usr/bin/env bash
# One command on a GPU host without network: train the testbed model (sgl_slim.testbed.pipeline), evaluate it in
# process, dense and with S2O's default (sgl_slim.testbed.eval), then serve it through SGLang with and without
# --s2o, and with --s2o-tau 0 (benchmarks/testbed_serve.py). ~9 minutes on an H200 (the "short" training plan,
# so that training and serving fit one 10-minute command). Usage:
#   [TESTBED_METHODS=dense,s2o:v5:1e-2] scripts/gpu_testbed_serve.sh OUT_DIR [benchmarks.testbed_serve flags,
#   e.g. --length 16384 or --s2o-flags "--s2o-variant v5"]
# OUT_DIR receives the checkpoint's parts (testbed_ckpt.tar.NN), testbed_results.jsonl, testbed_serve_gpu.jsonl.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$1"
shift
mkdir -p "$out"
source "$root/scripts/gpu_env.sh" gpu_testbed_serve
work="${TESTBED_WORK:-/tmp/testbed_work}"
"$py" -m sgl_slim.testbed.pipeline --out "$out" --work "$work" --plan short --train-budget 250 \
  --skip dense,calibrate,dump,sparse,extrapolate
"$py" -m sgl_slim.testbed.eval --model "$work/model" --methods "${TESTBED_METHODS:-dense,s2o:v4:1e-2}" --lengths 16384,32768 \
  --per-depth 20 --time-budget 150 --out "$out/testbed_results.jsonl"
"$py" -m benchmarks.testbed_serve --model "$work/model" --gpu --length 32768 --depths 0,0.25,0.5,0.75,1 \
  --per-depth 6 --tau0 --out "$out/testbed_serve_gpu.jsonl" "$@"
echo "gpu_testbed_serve: done in $(( $(date +%s) - t0 )) s"
