"""EAGLE-3 through SGLang's EAGLE3 worker, the GPU benchmark script (scripts/gpu_eagle_bench.sh,
benchmarks/eagle_sglang_gpu.py): end to end on the CPU in its tiny mode (train, export, serve without and with the
draft, compare), and the GPU server flags that keep CUDA graphs on in the GPU stand-in mode."""

import argparse
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks import eagle_sglang_gpu as bench
from serving import ROOT
from sgl_slim.standins import gpu as gpu_standins


@pytest.mark.e2e
def test_eagle_bench_script_tiny_on_cpu(tmp_path):
    out, models = tmp_path / "out", tmp_path / "models"
    env = dict(os.environ, PYTHON=sys.executable, EAGLE_TIMEOUT_S="900")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_eagle_bench.sh"), str(out), "--tiny",
                           "--model-dir", str(models)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1000, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [json.loads(line) for line in (out / "eagle_sglang_gpu.jsonl").read_text().splitlines()]
    env_row, rows = lines[0]["env"], lines[1:]
    assert env_row["git_sha"] and env_row["sglang"] and env_row["eagle_steps"] == 3, env_row
    phases = Counter(r["phase"] for r in rows)
    assert phases == {"target_train": 1, "draft_train": 1, "offline_acceptance": 3, "ready": 2, "warmup": 2,
                      "serve": 6, "server_log": 2, "summary": 3, "done": 1}, phases

    # what was served: a Qwen2 checkpoint of the trained target, and its EAGLE-3 draft through --eagle-draft
    assert json.loads((models / "target" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert json.loads((models / "draft" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    ready = {r["server"]: r for r in rows if r["phase"] == "ready"}
    assert "--eagle-draft" not in ready["plain"]["flags"]
    assert ready["eagle"]["flags"][-6:] == ["--eagle-draft", str(models / "draft"), "--eagle-steps", "3",
                                            "--eagle-draft-tokens", "4"]
    assert ready["plain"]["cuda_graphs"] == ready["eagle"]["cuda_graphs"] == []      # the CPU captures none

    offline = {r["batch"]: r for r in rows if r["phase"] == "offline_acceptance"}
    served = {r["batch"]: r for r in rows if r["phase"] == "serve" and r["server"] == "eagle"}
    for s in (r for r in rows if r["phase"] == "summary"):
        bs = s["batch"]
        assert s["total_tokens"] == bs * 16, s                                      # ignore_eos, --max-new 16
        # float32 on the CPU: lossless, token for token
        assert s["identical_sequences"] == bs and s["identical_leading_tokens"] == s["total_tokens"], s
        assert s["plain_tok_s"] > 0 and s["eagle_tok_s"] == pytest.approx(s["speedup"] * s["plain_tok_s"]), s
        # the trained draft is accepted, as served, exactly as sgl_slim's offline simulation of SGLang predicts
        assert s["accept_length"] > 1.5, s
        assert s["accept_length"] == pytest.approx(offline[bs]["accept_length"]), (s, offline[bs])
        assert s["accepted_drafts_histogram"] == offline[bs]["histogram"], (s, offline[bs])
        assert sum(s["accepted_drafts_histogram"]) == s["verifies"] == served[bs]["verifies"], s
    assert (out / "eagle_plain_server.log").is_file() and (out / "eagle_spec_server.log").is_file()
    assert "eagle_spec_server.log: CUDA graphs" in proc.stdout        # the script's digest of the server logs


def test_gpu_server_flags_keep_cuda_graphs_on(tmp_path):
    """On a GPU the servers capture decode CUDA graphs up to batch 16 and no prefill graph; the GPU stand-in
    mode must not add --disable-cuda-graph to that, and SGLang's own parser must accept the flags."""
    from sglang.srt.server_args import ServerArgs

    args = argparse.Namespace(tiny=False, mem_fraction=0.5)
    flags = gpu_standins.apply_gpu_defaults(bench.server_flags(tmp_path, args))
    assert "--disable-cuda-graph" not in flags
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    parsed = parser.parse_args(flags)
    assert parsed.cuda_graph_max_bs_decode == max(bench.BATCHES) and parsed.disable_prefill_cuda_graph
    assert not parsed.disable_cuda_graph and parsed.attention_backend == "triton"
    assert "--dtype" in flags and flags[flags.index("--dtype") + 1] == "bfloat16"


def test_captured_graphs_are_read_from_sglang_log_lines():
    log = ("[2026-12-04 02:08:53] Capture target verify CUDA graph begin. backend=full, num_tokens_per_req=4\n"
           "[2026-12-04 02:08:55] Capture target verify CUDA graph end. bs=[1, 2, 4, 8, 12, 16], elapsed=2.01 s, "
           "mem usage=0.10 GB, avail mem=70.00 GB.\n"
           "[2026-12-04 02:08:57] Capture draft decode CUDA graph end. elapsed=1.20 s, mem usage=0.05 GB, "
           "avail mem=69.90 GB.\n"
           "[2026-12-04 02:08:58] Capture draft extend CUDA graph end. elapsed=0.90 s, mem usage=0.01 GB\n")
    assert bench.captured_graphs(log) == ["target verify [1, 2, 4, 8, 12, 16]", "draft decode", "draft extend"]
    assert bench.captured_graphs("Capture cuda graph failed: out of memory") == []


def test_identical_counts_sequences_and_leading_tokens():
    assert bench.identical([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]) == (1, 4)
    assert bench.identical([[7]], [[8]]) == (0, 0)
