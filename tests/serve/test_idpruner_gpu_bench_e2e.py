"""The IDPruner serving benchmark's one-command script (scripts/gpu_idpruner_bench.sh, benchmarks/idpruner_gpu.py)
end to end on the CPU with the tiny model: one server with --idpruner, unpruned requests (keep 1.0 sent per
request) beside pruned ones, and a summary whose token counts show a quarter of the image tokens kept."""

import json
import os
import subprocess
import sys

import pytest

from serving import ROOT

pytestmark = pytest.mark.e2e


def test_idpruner_bench_script_tiny_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, IDP_TIMEOUT_S="900")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_idpruner_bench.sh"), str(out), "--tiny", "--model-dir",
         str(tmp_path / "model"), "--ttft-prompts", "2", "--rps-requests", "4", "--concurrency", "2",
         "--max-new", "4"], capture_output=True, text=True, cwd=ROOT, timeout=1000, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "idpruner_gpu.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "setup" and rows[0]["env"]["git_sha"], rows[0]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("ttft") == 4 and kinds.count("rps") == 2 and kinds[-1] == "summary", kinds
    assert "error" not in kinds, [r for r in rows if r["kind"] == "error"]
    batches = [r for r in rows if r["kind"] == "warmup_batch"]
    assert len(batches) == 2 and all(r["ok"] == r["requests"] == 2 for r in batches), batches
    for r in rows:
        if r["kind"] in ("warmup", "ttft"):
            assert r["ok"], r
            assert r["vision_tokens_total"] == 4 * 64, r            # 4 images of 224x224: 64 tokens each
            want = 4 * 64 if r["setting"] == "unpruned" else 4 * 16
            assert r["vision_tokens_kept"] == want, r
    s = rows[-1]
    u, p = s["unpruned"], s["pruned"]
    assert u["prompt_tokens"] - p["prompt_tokens"] == 4 * 64 - 4 * 16, s
    assert u["requests_per_s"] > 0 and p["requests_per_s"] > 0 and s["ttft_speedup"] > 0, s
    assert isinstance(s["goal_ttft_2.5x"], bool) and isinstance(s["goal_rps_2x"], bool), s
    assert (out / "idp_server.log").is_file()
