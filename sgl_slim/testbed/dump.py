"""Real activations: per-layer q/k/v (post-RoPE) of one long prompt, what the heads look like, and the
S2O error/density/time frontier on them beside the synthetic generator (``sgl_slim.attention.inputs``).

    python -m sgl_slim.testbed.dump --model DIR --length 32768 [--save qkv.pt] [--frontier] [--oracle] [--out F]

The prompt is a key-value retrieval sample of the "eval" text (so that retrieval heads have something to
find).  ``--save`` writes {"q": [layers] of [T, Hq, D], "k", "v": [T, Hkv, D]} (bf16) for other benchmarks.

Head statistics, per layer and q head, over sampled query rows i (exact fp32 causal softmax over keys 0..i):
  sink       mass on keys 0..3
  local      mass on keys i-127..i (the diagonal band)
  scattered  mass on the top 1% of the remaining (middle) keys
  tail       everything else: the mass a selection of sinks + band + a few scattered keys would drop
The same statistics of ``make_qkv`` at the same shape say how far the generator's assumptions are off.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from sgl_slim.testbed import append_jsonl

SINK = 4
BAND = 128
TOP_FRACTION = 0.01


def capture_qkv(model, ids: torch.Tensor) -> dict[int, tuple]:
    """{layer: (q [T, Hq, D], k [T, Hkv, D], v)} of one dense forward of ids [T]."""
    from sgl_slim.testbed.attn import Method, use_method  # noqa: PLC0415

    with torch.no_grad(), use_method(model, Method("capture", "capture")) as run:
        model.model(input_ids=ids[None])
    return dict(run.captured)


def query_rows(T: int, n: int) -> torch.Tensor:
    """n query positions spread over the second half of the sequence (long contexts), the last one included."""
    return torch.linspace(T // 2, T - 1, n).round().long().unique()


def head_stats(q: torch.Tensor, k: torch.Tensor, *, n_rows: int = 64, sm_scale: float | None = None) -> list[dict]:
    """Per q head: mean sink / local / scattered / tail mass over sampled rows.  q [T, Hq, D], k [T, Hkv, D]."""
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    scale = sm_scale or 1.0 / math.sqrt(D)
    rows = query_rows(T, n_rows).to(q.device)
    kk = k.float().repeat_interleave(G, 1).transpose(0, 1)                     # [Hq, T, D]
    s = torch.einsum("rhd,htd->hrt", q[rows].float(), kk) * scale               # [Hq, R, T]
    pos = torch.arange(T, device=q.device)
    s = s.masked_fill(pos[None, None, :] > rows[None, :, None], float("-inf"))
    p = torch.softmax(s, -1)
    sink = p[..., :SINK].sum(-1)
    band = (pos[None, :] > rows[:, None] - BAND) & (pos[None, :] <= rows[:, None])  # [R, T]
    band[:, :SINK] = False
    local = (p * band).sum(-1)
    middle = p.masked_fill(band[None] | (pos < SINK)[None, None, :], 0.0)
    n_top = max(1, int(TOP_FRACTION * T))
    scattered = middle.topk(n_top, -1).values.sum(-1)
    tail = (1 - sink - local - scattered).clamp(min=0)
    out = []
    for h in range(Hq):
        out.append({"head": h, "sink": sink[h].mean().item(), "local": local[h].mean().item(),
                    "scattered": scattered[h].mean().item(), "tail": tail[h].mean().item()})
    return out


def dense_fp32(q, k, v, scale):
    """fp32 causal attention, chunked over query rows (bounded memory).  -> [T, Hq, D] fp32."""
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    kk = k.float().repeat_interleave(G, 1).transpose(0, 1)
    vv = v.float().repeat_interleave(G, 1).transpose(0, 1)
    out = torch.empty(T, Hq, D, device=q.device)
    step = 2048
    for i in range(0, T, step):
        qs = q[i:i + step].float().transpose(0, 1)                                # [Hq, r, D]
        s = torch.einsum("hrd,htd->hrt", qs, kk[:, :i + step]) * scale
        mask = torch.arange(i + qs.shape[1], device=q.device)[None, :] > torch.arange(i, i + qs.shape[1],
                                                                                       device=q.device)[:, None]
        s = s.masked_fill(mask[None], float("-inf"))
        out[i:i + step] = torch.einsum("hrt,htd->hrd", torch.softmax(s, -1), vv[:, :i + step]).transpose(0, 1)
    return out


def frontier(qkv: dict[int, tuple], methods: list[str], *, source: str, block_size=None, segment_size=None,
             log=print) -> list[dict]:
    """rel-L2 against fp32 dense, density and time of each method on each layer's q/k/v."""
    from sgl_slim.testbed.attn import attend, parse_method  # noqa: PLC0415

    rows = []
    for layer, (q, k, v) in sorted(qkv.items()):
        scale = 1.0 / math.sqrt(q.shape[-1])
        ref = dense_fp32(q, k, v, scale)
        for text in methods:
            m = parse_method(text, block_size=block_size, segment_size=segment_size)
            attend(m, q, k, v, layer=layer, scale=scale)                           # warm-up / compile
            if q.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out, dens = attend(m, q, k, v, layer=layer, scale=scale)
            if q.is_cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t) * 1e3
            err = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append({"bench": "testbed_frontier", "source": source, "layer": layer, "length": q.shape[0],
                         "method": text, "density": dens, "rel_l2": err, "ms": ms})
            log(rows[-1])
    return rows


def oracle(qkv: dict[int, tuple], masses=(0.9, 0.99, 0.999), *, source: str, segment_size: int = 512,
           log=print) -> list[dict]:
    """The per-row token oracle (``baselines.token_oracle``: the fewest earlier keys holding ``mass``, the
    intra-segment part always kept): the least density any selection needs for a given error, per layer."""
    from sgl_slim.attention.baselines import token_oracle  # noqa: PLC0415

    rows = []
    for layer, (q, k, v) in sorted(qkv.items()):
        q, k, v = q.float(), k.float(), v.float()
        scale = 1.0 / math.sqrt(q.shape[-1])
        ref = dense_fp32(q, k, v, scale)
        for mass in masses:
            dens, out = token_oracle(q, k, v, mass=mass, segment_size=segment_size, sm_scale=scale)
            rows.append({"bench": "testbed_oracle", "source": source, "layer": layer, "length": q.shape[0],
                         "mass": mass, "segment_size": segment_size, "density": dens,
                         "rel_l2": ((out - ref).norm() / ref.norm()).item()})
            log(rows[-1])
    return rows


def long_prompt(tokenizer, length: int, seed: int = 3, stream=None) -> torch.Tensor:
    from sgl_slim.testbed.data import Pieces, corpus_stream, eval_samples  # noqa: PLC0415

    if stream is None:
        stream = corpus_stream(tokenizer, "eval", length * 4 + 200_000)
    s = eval_samples(stream, Pieces(tokenizer), kind="kv", length=length, depths=[0.5], per_depth=1, seed=seed)[0]
    return torch.tensor(s.ids)


def stats_rows(qkv: dict[int, tuple], source: str) -> list[dict]:
    rows = []
    for layer, (q, k, _) in sorted(qkv.items()):
        for r in head_stats(q, k):
            rows.append({"bench": "testbed_heads", "source": source, "layer": layer, "length": q.shape[0], **r})
    return rows


def generator_qkv(length: int, hq: int, hkv: int, d: int, device, layers: int = 1) -> dict[int, tuple]:
    from sgl_slim.attention.inputs import make_qkv  # noqa: PLC0415

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {i: make_qkv(length, hq, hkv, d, seed=1 + i, dtype=dtype, device=device) for i in range(layers)}


def summarize_heads(rows: list[dict]) -> list[dict]:
    """Mean and range of each statistic per source (one line per source)."""
    out = []
    for source in sorted({r["source"] for r in rows}):
        sel = [r for r in rows if r["source"] == source]
        line = {"source": source, "heads": len(sel)}
        for key in ("sink", "local", "scattered", "tail"):
            vals = sorted(r[key] for r in sel)
            line[key] = {"mean": sum(vals) / len(vals), "min": vals[0], "max": vals[-1],
                         "median": vals[len(vals) // 2]}
        out.append(line)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--save", default=None, help="write the q/k/v of every layer here (torch.save)")
    ap.add_argument("--frontier", action="store_true", help="also the rel-L2 / density / time frontier")
    ap.add_argument("--methods", default="s2o:v1:1e-4,s2o:v2:1e-3,s2o:v2:1e-2,topcdf:0.95,pbs:0.95")
    ap.add_argument("--oracle", action="store_true", help="also the token oracle's density / rel-L2 per layer")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer  # noqa: PLC0415

    from sgl_slim.testbed.model import load_model  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    qkv = capture_qkv(model, long_prompt(tokenizer, args.length).to(device))
    if args.save:
        torch.save({n: [qkv[i][j].cpu() for i in sorted(qkv)] for j, n in enumerate("qkv")}, args.save)
    cfg = model.config
    gen = generator_qkv(args.length, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, device)
    rows = stats_rows(qkv, "model") + stats_rows(gen, "generator")
    for line in summarize_heads(rows):
        print(json.dumps(line), flush=True)
    if args.frontier:
        methods = args.methods.split(",")
        rows += frontier(qkv, methods, source="model", log=lambda r: print(json.dumps(r), flush=True))
        rows += frontier(gen, methods, source="generator", log=lambda r: print(json.dumps(r), flush=True))
    if args.oracle:
        rows += oracle(qkv, source="model", log=lambda r: print(json.dumps(r), flush=True))
        rows += oracle(gen, source="generator", log=lambda r: print(json.dumps(r), flush=True))
    if args.out:
        append_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
