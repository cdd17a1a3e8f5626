#!/usr/bin/env bash
# One command on a GPU host without network: install the carried wheels (scripts/gpu_install.sh) unless SGLang
# is already importable, then measure a pruning toggle's TTFT and requests/s through one SGLang server on a
# random-weight 7B-shape model: WORKLOAD "idpruner" (Qwen2.5-VL-7B, 4-image prompts, benchmarks/idpruner_gpu.py)
# or "samp" (Qwen2-Audio-7B, 30 s clips, benchmarks/samp_gpu.py); about 4-6 minutes each on an H200. Usage:
#   scripts/gpu_toggle_bench.sh WORKLOAD OUT_DIR [the benchmark's flags, e.g. --tiny for a CPU dry run]
# OUT_DIR receives WORKLOAD_gpu.jsonl and the server's log. A hard timeout (IDP_TIMEOUT_S, default 380 s) stops
# the benchmark, which stops its server; the JSON lines measured so far stay.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$1"
out="$2"
shift 2
case "$work" in
  idpruner) log="$out/idp_server.log" ;;
  samp) log="$out/samp_server.log" ;;
  *) echo "gpu_toggle_bench: WORKLOAD must be idpruner or samp, got '$work'" >&2; exit 2 ;;
esac
mkdir -p "$out"
source "$root/scripts/gpu_env.sh" gpu_toggle_bench
rc=0
timeout -k 30 "${IDP_TIMEOUT_S:-380}" \
  "$py" -m "benchmarks.${work}_gpu" --out "$out/${work}_gpu.jsonl" --logs "$out" "$@" || rc=$?
echo "gpu_toggle_bench: exit $rc after $(( $(date +%s) - t0 )) s"
if [ -f "$log" ]; then
  echo "gpu_toggle_bench: server log lines worth reading (import errors, missing stand-in ops, errors):"
  grep -E "Ignore import error|looked up but not defined|Traceback|Error|error" "$log" \
    | sed "s/^\[[^]]*\] //" | sort | uniq -c | sort -rn | head -n 25 | cut -c1-400 || true
  tail -n 25 "$log" | cut -c1-400 | sed 's/^/server| /'
fi
exit "$rc"
