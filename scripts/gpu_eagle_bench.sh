#!/usr/bin/env bash
# One command on a GPU host without network: install the carried wheels (scripts/gpu_install.sh) unless SGLang
# is already importable, then train the EAGLE-3 target and draft of benchmarks/eagle_gpu.py and measure them
# through SGLang's own EAGLE3 worker with CUDA graphs, against the same server without the draft
# (benchmarks/eagle_sglang_gpu.py); about 7 minutes on an H200. Usage:
#   scripts/gpu_eagle_bench.sh OUT_DIR [the benchmark's flags, e.g. --sha SHA; --tiny for a CPU dry run]
# OUT_DIR receives eagle_sglang_gpu.jsonl and the two servers' logs. A hard timeout (EAGLE_TIMEOUT_S, default
# 500 s) stops the benchmark, which stops its servers; the JSON lines measured so far stay.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$1"
shift
mkdir -p "$out"
source "$root/scripts/gpu_env.sh" gpu_eagle_bench
rc=0
timeout -k 30 "${EAGLE_TIMEOUT_S:-500}" "$py" -m benchmarks.eagle_sglang_gpu --out "$out" --logs "$out" "$@" || rc=$?
echo "gpu_eagle_bench: exit $rc after $(( $(date +%s) - t0 )) s"
for log in "$out"/eagle_plain_server.log "$out"/eagle_spec_server.log; do
  [ -f "$log" ] || continue
  echo "gpu_eagle_bench: $(basename "$log"): CUDA graphs, missing stand-in ops, errors:"
  grep -E "CUDA graph end|looked up but not defined|Traceback|Error|error" "$log" \
    | sed "s/^\[[^]]*\] //" | sort | uniq -c | sort -rn | head -n 25 | cut -c1-400 || true
  tail -n 15 "$log" | cut -c1-400 | sed 's/^/server| /'
done
exit "$rc"
