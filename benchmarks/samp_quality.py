"""Samp quality proxy: how well do K kept audio tokens cover the N original ones?

Methods, all at exactly K = round(N * keep_ratio) tokens:
  samp        merge (threshold t) + DPP MAP prune (sgl_slim.audio.samp_compress)
  merge-only  Samp's merge alone, at the least aggressive threshold that reaches K (bisection; the keep
              constraint stops merging at exactly K)
  uniform     evenly spaced tokens (i = floor((j + 0.5) N / K))
  random      K random tokens, sorted (mean of 5 seeds)
Metrics, over the N original tokens x_i against the kept set Y:
  coverage    mean_i max_j cos(x_i, y_j)                       (1 = every token has a perfect stand-in)
  rel_err     mean_i min_j ||x_i - y_j|| / ||x_i||              (reconstruction by the nearest kept token)

Token sets (no trained audio model can be loaded here; both are labelled as proxies):
  mel         synthetic speech-like clips (voiced glides with harmonics, noise bursts, pauses), Whisper log-mel,
              4 frames averaged per token (Qwen2-Audio's 40 ms token rate), centred per clip; attention proxy
              = one softmax(z z^T / sqrt(D)) head over standardised tokens
  demo-audio  the same clips through the demo-audio model's (random-weight) encoder + projector, with the
              encoder's real recomputed last-layer attention

Run: ~/.cache/sgl_slim/venv/bin/python -m benchmarks.samp_quality
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import markdown_table, record, write_results
from sgl_slim.audio import attention_stats, encoder_attention_stats, samp_compress
from sgl_slim.audio.samp import SampAttention, merge_clusters
from sgl_slim.config import SampConfig

SR = 16000


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Piecewise-stationary audio: voiced segments (f0 glide + harmonics), noise bursts and pauses."""
    rng = np.random.default_rng(seed)
    out, total = [], int(seconds * SR)
    while sum(len(s) for s in out) < total:
        kind = rng.choice(["voiced", "noise", "pause"], p=[0.55, 0.25, 0.2])
        n = int(rng.uniform(0.06, 0.35) * SR)
        t = np.arange(n) / SR
        if kind == "voiced":
            f0 = rng.uniform(90, 250) * (1 + rng.uniform(-0.3, 0.3) * t / max(t[-1], 1e-3))
            phase = 2 * np.pi * np.cumsum(f0) / SR
            seg = sum(rng.uniform(0.2, 1.0) / h * np.sin(h * phase) for h in range(1, 8))
        elif kind == "noise":
            seg = rng.standard_normal(n) * rng.uniform(0.05, 0.3)
        else:
            seg = rng.standard_normal(n) * 0.002
        out.append(seg * np.hanning(n) ** 0.2)
    return (0.3 * np.concatenate(out)[:total] / max(1e-6, np.abs(np.concatenate(out)).max())).astype(np.float32)


def mel_tokens(audio: np.ndarray):
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=SR)
    mel = torch.from_numpy(fe(audio, sampling_rate=SR, return_tensors="np").input_features[0])   # [128, 3000]
    n = len(audio) // SR * 25
    x = mel[:, : 4 * n].T.reshape(n, 4, 128).mean(1)                   # [N, 128] at 25 tokens / s
    x = x - x.mean(0, keepdim=True)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    probs = torch.softmax(z @ z.T / math.sqrt(z.shape[1]), dim=-1)[None]   # one head [1, N, N]
    return x, attention_stats(probs)


def demo_tokens(model, proc, audio: np.ndarray):
    inputs = proc(text=["<|audio_bos|><|AUDIO|><|audio_eos|>"], audio=[audio], return_tensors="pt",
                  audio_kwargs={"truncation": True})
    tower, projector = model.model.audio_tower, model.model.multi_modal_projector
    captured = []
    handle = tower.layers[-1].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        tokens = projector(tower(inputs.input_features).last_hidden_state)[0]
    handle.remove()
    n = len(audio) // SR * 25
    stats = encoder_attention_stats(tower.layers[-1], captured[0], valid_frames=[2 * n], n_tokens=[n])[0]
    return tokens[:n], stats


def coverage(x: torch.Tensor, kept: torch.Tensor) -> tuple[float, float]:
    cos = F.normalize(x, dim=-1) @ F.normalize(kept, dim=-1).T
    err = torch.cdist(x, kept).min(dim=1).values / x.norm(dim=-1).clamp_min(1e-12)
    return float(cos.max(dim=1).values.mean()), float(err.mean())


def merge_only(x: torch.Tensor, stats: SampAttention, keep: int) -> torch.Tensor:
    lo, hi = -1.0, 1.0                      # clusters(lo) == keep (everything merges down to the constraint)
    if merge_clusters(x, keep=keep, merge_threshold=hi).numel() == keep:
        lo = hi
    for _ in range(30):
        mid = (lo + hi) / 2
        if merge_clusters(x, keep=keep, merge_threshold=mid).numel() == keep:
            lo = mid
        else:
            hi = mid
    out, groups = samp_compress(x, stats, keep=keep, merge_threshold=lo)   # C == keep: no DPP step
    assert len(groups) == keep
    return out


def methods(x, stats, keep, seed):
    n = x.shape[0]
    yield "samp t=0.9", samp_compress(x, stats, keep=keep, merge_threshold=0.9)[0]
    yield "samp t=0.8", samp_compress(x, stats, keep=keep, merge_threshold=0.8)[0]
    yield "samp no-merge (DPP only)", samp_compress(x, stats, keep=keep, merge_threshold=2.0)[0]
    yield "merge-only", merge_only(x, stats, keep)
    yield "uniform", x[((torch.arange(keep) + 0.5) * n / keep).long()]
    g = torch.Generator().manual_seed(seed)
    yield "random", [x[torch.randperm(n, generator=g)[:keep].sort().values] for _ in range(5)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", default="benchmarks/results/samp_quality.jsonl")
    args = ap.parse_args()
    torch.manual_seed(0)
    from sgl_slim.demo import ensure_demo
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
    path = ensure_demo("demo-audio")
    proc = AutoProcessor.from_pretrained(path)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()

    acc: dict[tuple, list] = {}
    for clip in range(args.clips):
        audio = speech_like(args.seconds, seed=clip)
        for source, (x, stats) in (("mel", mel_tokens(audio)), ("demo-audio", demo_tokens(model, proc, audio))):
            x = x.float()
            for ratio in (0.6, 0.4, 0.25):
                keep = SampConfig(keep_ratio=ratio).keep_count(x.shape[0])
                for name, kept in methods(x, stats, keep, seed=clip):
                    sets = kept if isinstance(kept, list) else [kept]
                    vals = [coverage(x, k) for k in sets]
                    acc.setdefault((source, ratio, name), []).append(
                        (statistics.mean(v[0] for v in vals), statistics.mean(v[1] for v in vals)))
    rows = []
    for (source, ratio, name), vals in acc.items():
        rows.append(record("samp_quality", tokens=source, keep_ratio=ratio, method=name, clips=len(vals),
                           n_tokens=int(args.seconds * 25), coverage=statistics.mean(v[0] for v in vals),
                           rel_err=statistics.mean(v[1] for v in vals)))
    write_results(args.out, rows)
    print(markdown_table(rows, ["tokens", "keep_ratio", "method", "coverage", "rel_err"]))


if __name__ == "__main__":
    main()
