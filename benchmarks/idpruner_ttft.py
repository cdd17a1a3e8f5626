"""IDPruner TTFT and throughput through the CPU server, image-heavy or video prompts, keep 1.0 / 0.5 / 0.25 / 0.1.

    python -m benchmarks.idpruner_ttft --out benchmarks/results/idpruner_ttft.jsonl
    python -m benchmarks.idpruner_ttft --video-frames 16 --out benchmarks/results/idpruner_ttft_video.jsonl

The stock demo's time is mostly overhead, so this uses a LARGER demo language model (``--hidden``,
``--layers``; built with sgl_slim.demo.ensure_demo overrides) so that, as in real 7B VLMs, the language model
dominates prefill. Each prompt carries ``--images`` distinct 448x448 images (256 vision tokens each at the
demo's pixel limit) and a short question; with ``--video-frames N``, one distinct N-frame video instead (224x224 at
2 fps, a generated Motion-JPEG AVI; SGLang's preprocessing keeps every frame and scales them to 336x336: N/2
frame groups of 144 tokens, each pruned on its own). One server per keep ratio, all running at once, requests
alternating between them (float32, radix cache off so every request pays its prefill); per request: TTFT
(streamed, first token), end-to-end latency, prompt tokens.
Also reported: the share of the vision tower's time spent in selection, measured in-process on the same
vision features shape.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import statistics
import sys
from pathlib import Path

from sgl_slim.bench.runner import LaunchedServer, running
from benchmarks.harness import env_info, markdown_table, record, stream_generate, wave_image, write_results


def image_b64(seed: int, size: int = 448) -> str:
    return base64.b64encode(wave_image(seed, size)).decode()


def video_b64(seed: int, frames: int) -> str:
    import random

    from sgl_slim.bench.workload import video_data_url

    return video_data_url(frames, random.Random(seed)).split(",", 1)[1]


def one_request(port: int, media: list[str], max_new: int, kind: str = "image") -> dict:
    pad = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
    prompt = ("<|im_start|>user\n" + "".join(f"<|vision_start|>{pad}<|vision_end|>" for _ in media)
              + f"Compare these {kind}s.<|im_end|>\n<|im_start|>assistant\n")
    body = {"text": prompt, f"{kind}_data": media, "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}}
    ttft, total, last = stream_generate(f"http://127.0.0.1:{port}", body)
    meta = last["meta_info"]
    return {"ttft_s": ttft, "latency_s": total, "prompt_tokens": meta["prompt_tokens"],
            "completion_tokens": meta["completion_tokens"]}


def selection_share(n: int, hidden: int) -> dict:
    """Selection time for one image's n tokens of width hidden (default importance, keep 25%), CPU."""
    import torch

    from benchmarks.harness import time_ms
    from sgl_slim.vision import idpruner_select

    feats = torch.randn(n, hidden)
    return {"selection_ms_per_image": time_ms(lambda: idpruner_select(feats, None, round(n * 0.25)),
                                              warmup=2, iters=10)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keeps", default="1.0,0.25")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--video-frames", type=int, default=0, help="one video of this many frames per request instead "
                    "of --images images (0: images)")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--port", type=int, default=32200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    # SIGTERM -> SystemExit, so running() below stops the servers (they run in their own sessions)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from sgl_slim.demo import ensure_demo

    model = str(ensure_demo("demo", hidden_size=args.hidden, num_hidden_layers=args.layers,
                            intermediate_size=4 * args.hidden, num_attention_heads=8, num_key_value_heads=4))
    keeps = [float(k) for k in args.keeps.split(",")]
    kind = "video" if args.video_frames else "image"
    per_request = 1 if args.video_frames else args.images
    media = [video_b64(s, args.video_frames) if args.video_frames else image_b64(s)
             for s in range(per_request * (args.requests + 1))]
    rows, logs = [], Path("/tmp/sgl_slim_idpruner_ttft")
    logs.mkdir(exist_ok=True)
    # All servers run at once and requests alternate between them (round robin), so the machine's load,
    # which drifts on a shared host, hits every keep ratio alike.
    servers = {keep: LaunchedServer(server_args(model, keep), port=args.port + i, log_path=logs / f"keep{keep}.log")
               for i, keep in enumerate(keeps)}
    runs: dict[float, list[dict]] = {keep: [] for keep in keeps}
    with running(servers):
        for keep in keeps:
            one_request(servers[keep].port, media[:per_request], 2, kind)        # warm-up (first-use costs)
        for r in range(args.requests):                                           # distinct media: no cache hits
            batch = media[(r + 1) * per_request:(r + 2) * per_request]
            for keep in keeps:
                runs[keep].append(one_request(servers[keep].port, batch, args.max_new, kind))
    for keep in keeps:
        rs = runs[keep]
        row = record("idpruner_ttft", keep_ratio=keep, media=kind, images=0 if args.video_frames else args.images,
                     video_frames=args.video_frames, hidden=args.hidden, layers=args.layers,
                     prompt_tokens=rs[0]["prompt_tokens"],
                     ttft_ms=1e3 * statistics.median(r["ttft_s"] for r in rs),
                     latency_ms=1e3 * statistics.median(r["latency_s"] for r in rs),
                     decode_tok_s=statistics.median(
                         (r["completion_tokens"] - 1) / max(r["latency_s"] - r["ttft_s"], 1e-9) for r in rs),
                     requests=args.requests, load_avg_1m=os.getloadavg()[0])
        rows.append(row)
        print(row, flush=True)
    base = next((r for r in rows if r["keep_ratio"] == 1.0), None)
    if base:
        for r in rows:
            r["ttft_speedup"] = base["ttft_ms"] / r["ttft_ms"]
            r["prompt_cut"] = base["prompt_tokens"] / r["prompt_tokens"]
    rows.append(record("idpruner_selection_cpu", tokens=256, hidden=args.hidden, **selection_share(256, args.hidden)))
    write_results(args.out, rows, env=env_info())
    print(markdown_table([r for r in rows if r["bench"] == "idpruner_ttft"],
                         ["keep_ratio", "media", "prompt_tokens", "prompt_cut", "ttft_ms", "ttft_speedup",
                          "latency_ms", "decode_tok_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
