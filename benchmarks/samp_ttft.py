"""TTFT through the CPU demo-audio server at Samp keep ratios 1.0 / 0.6 / 0.4 (one server per ratio, all up together).

Model: demo-audio with a wider text model (--hidden/--layers) so that prefill is not free; random weights.
Requests: one clip per request, distinct clips (no cache hits: --disable-radix-cache, distinct audio), greedy,
streamed: TTFT = first streamed chunk. Median over --requests after one warm-up request per server; requests go
round-robin over the servers, one at a time. Keep 1.0 runs with
--samp --samp-keep-ratio 1.0 (identity: Samp hooks installed, nothing compressed).

Run: ~/.cache/sgl_slim/venv/bin/python -m benchmarks.samp_ttft --out benchmarks/results/samp_ttft.jsonl
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import statistics
import sys
from pathlib import Path

from sgl_slim.bench.runner import LaunchedServer, running
from benchmarks.harness import env_info, markdown_table, record, stream_generate, write_results

PROMPT = "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is said?"


def wav_b64(seconds: float, seed: int) -> str:
    import numpy as np
    import soundfile as sf
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.3 * np.sin(2 * math.pi * (250 + 40 * seed) * t * (1 + 0.2 * t)) * (0.6 + 0.4 * np.sin(6 * t))
    wave += 0.03 * np.random.default_rng(seed).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()








def server_args(model: str, keep: float, threshold: float) -> list[str]:
    return ["--model-path", model, "--dtype", "float32", "--disable-radix-cache", "--max-total-tokens", "16384",
            "--skip-server-warmup", "--samp", "--samp-keep-ratio", str(keep), "--samp-merge-threshold", str(threshold)]


def one_request(port: int, audio: str, max_new: int) -> dict:
    body = {"text": PROMPT, "audio_data": [audio], "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}}
    ttft, latency, last = stream_generate(f"http://127.0.0.1:{port}", body)
    meta = last["meta_info"]
    return {"ttft_s": ttft, "latency_s": latency, "prompt_tokens": meta["prompt_tokens"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keeps", default="1.0,0.6,0.4")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=4)
    ap.add_argument("--port", type=int, default=33200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from sgl_slim.demo import ensure_demo
    model = str(ensure_demo("demo-audio", hidden_size=args.hidden, num_hidden_layers=args.layers,
                            intermediate_size=4 * args.hidden, num_attention_heads=8, num_key_value_heads=4))
    keeps = [float(k) for k in args.keeps.split(",")]
    audios = [wav_b64(args.seconds, s) for s in range(args.requests + 1)]
    logs = Path("/tmp/sgl_slim_samp_ttft")
    logs.mkdir(exist_ok=True)
    # all servers up at once, requests interleaved round-robin: load changes on the shared machine hit every
    # keep ratio alike
    servers = {k: LaunchedServer(server_args(model, k, args.threshold), port=args.port + i,
                                 log_path=logs / f"keep{k}.log") for i, k in enumerate(keeps)}
    runs: dict[float, list] = {k: [] for k in keeps}
    with running(servers):
        for k in keeps:
            one_request(servers[k].port, audios[0], 2)                        # warm-up
        for a in audios[1:]:
            for k in keeps:
                runs[k].append(one_request(servers[k].port, a, args.max_new))
    rows = []
    for k in keeps:
        rows.append(record("samp_ttft", keep_ratio=k, merge_threshold=args.threshold, clip_s=args.seconds,
                           hidden=args.hidden, layers=args.layers, prompt_tokens=runs[k][0]["prompt_tokens"],
                           ttft_ms=1e3 * statistics.median(r["ttft_s"] for r in runs[k]),
                           ttft_ms_all=[round(1e3 * r["ttft_s"], 1) for r in runs[k]],
                           latency_ms=1e3 * statistics.median(r["latency_s"] for r in runs[k]),
                           requests=len(runs[k])))
        print(rows[-1], flush=True)
    base = next((r for r in rows if r["keep_ratio"] == 1.0), None)
    if base:
        for r in rows:
            r["ttft_speedup"] = base["ttft_ms"] / r["ttft_ms"]
    write_results(args.out, rows, env=env_info())
    print(markdown_table(rows, ["keep_ratio", "prompt_tokens", "ttft_ms", "ttft_speedup", "latency_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
