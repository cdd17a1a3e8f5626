"""The pruning toggles' serving benchmark script (scripts/gpu_toggle_bench.sh; benchmarks/idpruner_gpu.py and
samp_gpu.py over benchmarks/toggle_gpu.py) end to end on the CPU with the tiny models: one server with the toggle,
unpruned requests (keep 1.0 sent per request) beside pruned ones, and a summary whose token counts show the
server's keep ratio applied to the pruned requests only."""

import json
import os
import subprocess
import sys

import pytest

from serving import ROOT

pytestmark = pytest.mark.e2e


def _run_tiny(workload: str, tmp_path, *flags: str) -> list[dict]:
    """scripts/gpu_toggle_bench.sh WORKLOAD with the tiny model on the CPU; its JSON lines."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, IDP_TIMEOUT_S="900")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_toggle_bench.sh"), workload, str(out), "--tiny", "--model-dir",
         str(tmp_path / "model"), "--concurrency", "2", *flags],
        capture_output=True, text=True, cwd=ROOT, timeout=1000, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in (out / f"{workload}_gpu.jsonl").read_text().splitlines()]


def test_idpruner_bench_script_tiny_on_cpu(tmp_path):
    out = tmp_path / "out"
    rows = _run_tiny("idpruner", tmp_path, "--ttft-prompts", "2", "--rps-requests", "4", "--max-new", "4")
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
            # where the time went: each phase measured, together within the request's time to its first token
            assert all(r[name] >= 0 for name in ("preprocess_s", "to_forward_s", "prefill_s")), r
            assert r["preprocess_s"] + r["to_forward_s"] + r["prefill_s"] <= r["ttft_s"] + 0.05, r
    s = rows[-1]
    u, p = s["unpruned"], s["pruned"]
    assert u["prompt_tokens"] - p["prompt_tokens"] == 4 * 64 - 4 * 16, s
    assert u["requests_per_s"] > 0 and p["requests_per_s"] > 0 and s["ttft_speedup"] > 0, s
    assert u["prefill_s_median"] > 0 and p["preprocess_s_median"] > 0, s
    assert isinstance(s["goal_ttft_2.5x"], bool) and isinstance(s["goal_rps_2x"], bool), s
    assert (out / "idp_server.log").is_file()


def test_samp_bench_script_tiny_on_cpu(tmp_path):
    out = tmp_path / "out"
    rows = _run_tiny("samp", tmp_path, "--ttft-prompts", "2", "--rps-requests", "2", "--max-new", "2",
                     "--clip-s", "10")
    kinds = [r["kind"] for r in rows]
    assert kinds.count("ttft") == 4 and kinds.count("rps") == 2 and kinds[-1] == "summary", kinds
    assert "error" not in kinds, [r for r in rows if r["kind"] == "error"]
    for r in rows:
        if r["kind"] in ("warmup", "ttft"):
            assert r["ok"], r
            assert r["audio_tokens_total"] == 250, r              # a 10 s clip: 250 audio tokens
            assert r["audio_tokens_kept"] == (250 if r["setting"] == "unpruned" else 150), r   # keep 0.6
    s = rows[-1]
    assert s["unpruned"]["prompt_tokens"] - s["pruned"]["prompt_tokens"] == 100, s
    assert s["unpruned"]["requests_per_s"] > 0 and s["pruned"]["requests_per_s"] > 0, s
    assert not any(k.startswith("goal_") for k in s), s      # the issue sets no speed goal for Samp
    assert (out / "samp_server.log").is_file()


def test_toggle_bench_script_rejects_an_unknown_workload(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_toggle_bench.sh"), "video", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "WORKLOAD must be idpruner or samp" in proc.stderr, proc.stderr
