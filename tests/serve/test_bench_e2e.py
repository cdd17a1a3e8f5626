"""`python -m sgl_slim.bench` against the running demo servers (a few requests): the command line, its JSON
output, and the prompt tokens the toggles save (IDPruner keeps a quarter of the image's 64 tokens)."""

import json
import subprocess
import sys

import pytest

from serving import ROOT, greedy, image_message, png_data_url

pytestmark = pytest.mark.e2e


def _bench(base_url, tmp_path, *args):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "sgl_slim.bench", "--base-url", base_url, "--num-requests", "4",
                           "--concurrency", "2", "--max-tokens", "6", "--warmup", "0", "--no-progress",
                           "--output", str(out), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_bench_image_video_and_longctx_on_the_image_server(vl_server, tmp_path):
    result, table = _bench(vl_server.base_url, tmp_path, "--scenario", "image,video,longctx,text",
                           "--longctx-words", "200", "--request-rate", "20", "--video-frames", "4")
    assert "| TTFT p50 ms |" in table and "| prompt tokens/req |" in table
    by = {r["scenario"]: r for r in result["runs"]}
    assert set(by) == {"image", "video", "longctx", "text"}
    for scenario, run in by.items():
        s = run["summary"]
        assert (s["completed"], s["failed"]) == (4, 0), (scenario, s["errors"])
        assert all(r["completion_tokens"] == 6 for r in run["requests"]), scenario
        assert 0 < s["ttft_ms_p50"] <= s["ttft_ms_p90"] <= s["ttft_ms_p99"], s
        assert s["output_tok_per_s"] > 0 and s["req_per_s"] > 0
    assert by["longctx"]["summary"]["prompt_tokens_mean"] > 200  # 200 words (several tokens each, tiny vocab)
    # 4 frames: 2 frame groups of 144 tokens, a quarter kept by IDPruner (72) plus the text
    assert 72 < by["video"]["summary"]["prompt_tokens_mean"] < 2 * 144
    assert result["environment"]["git_sha"]


def test_bench_counts_the_tokens_idpruner_saves(vl_server):
    """The image scenario's prompt tokens equal text-only + 64 * 0.25 kept + 2 delimiters (tokens saved: 48)."""
    client = vl_server.openai()
    with_image = greedy(client, image_message("Describe the image.", png_data_url()), max_tokens=1)
    text_only = greedy(client, image_message("Describe the image.", None), max_tokens=1)
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 16 + 2


def test_bench_mixed_on_the_audio_server_uses_the_kinds_it_takes(audio_server, tmp_path):
    result, _ = _bench(audio_server.base_url, tmp_path, "--scenario", "mixed", "--audio-seconds", "1")
    (run,) = result["runs"]
    assert run["kinds"] == ["text", "audio"]
    assert sorted(r["kind"] for r in run["requests"]) == ["audio", "audio", "text", "text"]
    assert run["summary"]["failed"] == 0, run["summary"]["errors"]
