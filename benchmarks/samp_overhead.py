"""Samp's cost as a share of the audio encoder's (CPU): the goal is <= 5 %.

Encoder: a Qwen2-Audio-7B-sized Whisper encoder (transformers' Qwen2AudioEncoder with its default config:
d_model 1280, 32 layers, 20 heads, FFN 5120; random weights: the cost does not depend on them) plus the
projector to the LLM width (4096), fp32, on the fixed 30 s window (3000 mel frames) that Qwen2-Audio always
encodes, whatever the clip length. This is exactly what SGLang's get_audio_feature runs.
Samp, per clip of N tokens: last-layer attention statistics recomputed from its Q/K
(encoder_attention_stats, softmax over the 1500 frames, statistics over the clip's 2N) + samp_compress on the
[N, 4096] projected tokens to keep_count(N).
Also the demo-audio model (tiny encoder), where Samp cannot be cheap relative to the encoder: shown for honesty.

Run: ~/.cache/sgl_slim/venv/bin/python -m benchmarks.samp_overhead
     python -m benchmarks.samp_overhead --device cuda --out benchmarks/results/samp_overhead_gpu.jsonl   (bf16)
Besides the totals, the compression's parts: the merge scan (``merge_clusters``) and the greedy DPP
(``dpp_select``) on the clip's device, and the DPP on the host (its [C, C] kernel copied there first).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.harness import markdown_table, record, time_ms, write_results
from sgl_slim.audio import encoder_attention_stats, samp_compress
from sgl_slim.audio.samp import dpp_select, merge_clusters
from sgl_slim.config import SampConfig


def build(full: bool):
    from transformers import Qwen2AudioEncoderConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
    torch.manual_seed(0)
    if full:
        cfg, width = Qwen2AudioEncoderConfig(), 4096
    else:
        cfg = Qwen2AudioEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64)
        width = 64
    enc = Qwen2AudioEncoder(cfg).eval()
    return enc, nn.Linear(cfg.d_model, width), cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder-iters", type=int, default=1)
    ap.add_argument("--samp-iters", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    ap.add_argument("--out", default="benchmarks/results/samp_overhead.jsonl")
    args = ap.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    rows = []
    for name, full in (("qwen2-audio-7b encoder", True), ("demo-audio encoder", False)):
        enc, proj, cfg = build(full)
        enc, proj = enc.to(args.device, dtype), proj.to(args.device, dtype)
        mel = torch.randn(1, cfg.num_mel_bins, 3000, device=args.device, dtype=dtype)
        captured = []
        handle = enc.layers[-1].register_forward_pre_hook(lambda m, a: captured.append(a[0]))

        @torch.no_grad()
        def encode():
            captured.clear()
            return proj(enc(mel).last_hidden_state)

        tokens_all = encode()[0]                                              # [750, width] (also the warm-up)
        enc_ms = time_ms(encode, warmup=0, iters=args.encoder_iters)
        layer_in = captured[0]
        handle.remove()
        for seconds in (5, 10, 30):
            n = seconds * 25
            for ratio in (0.6, 0.4):
                keep = SampConfig(keep_ratio=ratio).keep_count(n)
                tokens = tokens_all[:n]

                @torch.no_grad()
                def stats_only():
                    return encoder_attention_stats(enc.layers[-1], layer_in, valid_frames=[2 * n], n_tokens=[n])[0]

                stats = stats_only()

                @torch.no_grad()
                def compress_only():
                    return samp_compress(tokens, stats, keep=keep, merge_threshold=args.threshold)

                stats_ms = time_ms(stats_only, warmup=1, iters=args.samp_iters)
                compress_ms = time_ms(compress_only, warmup=1, iters=args.samp_iters)
                merge_ms = time_ms(lambda: merge_clusters(tokens, keep=keep, merge_threshold=args.threshold),
                                   warmup=1, iters=args.samp_iters)
                unit = torch.nn.functional.normalize(tokens.double(), dim=-1)
                kernel = unit @ unit.T                                           # a [C, C] kernel of this size
                dpp_ms = time_ms(lambda: dpp_select(kernel, keep), warmup=1, iters=args.samp_iters)
                dpp_host_ms = time_ms(lambda: dpp_select(kernel.cpu(), keep), warmup=1, iters=args.samp_iters)
                kept, groups = compress_only()
                samp_ms = stats_ms + compress_ms
                rows.append(record("samp_overhead", encoder=name, clip_s=seconds, n_tokens=n, keep_ratio=ratio,
                                   kept=kept.shape[0], merged_tokens=sum(len(g) for g in groups if len(g) > 1),
                                   encoder_ms=enc_ms, stats_ms=stats_ms, compress_ms=compress_ms,
                                   merge_ms=merge_ms, dpp_ms=dpp_ms, dpp_host_ms=dpp_host_ms, device=args.device,
                                   samp_ms=samp_ms, share_pct=100 * samp_ms / enc_ms,
                                   threads=torch.get_num_threads()))
                print(rows[-1], flush=True)
    write_results(args.out, rows)
    print(markdown_table(rows, ["encoder", "clip_s", "n_tokens", "keep_ratio", "kept", "encoder_ms", "stats_ms",
                                "compress_ms", "merge_ms", "dpp_ms", "dpp_host_ms", "share_pct"]))


if __name__ == "__main__":
    main()
