"""Evaluate the testbed model with every layer's prefill attention replaced by a method (``attn``).

    python -m sgl_slim.testbed.eval --model DIR --methods dense,s2o:v2:1e-4,topcdf:0.95 \\
        --lengths 4096,16384,32768 --per-depth 50 --out results.jsonl

Per method and length:
  * held-out loss: mean next-token cross-entropy on windows of the "eval" stdlib files (never trained on);
  * retrieval: passkey and key-value lookup (8 keys) with the asked needle at depths 0..100%; a sample is
    right when EVERY answer token is the argmax given the previous answer tokens (teacher forcing = greedy
    decoding's exact match, in one forward pass).  The answer tokens are part of the prefill, so the last
    query rows also run the method (serving would decode them with dense attention: a slightly harsher test);
  * density (computed / causal score blocks over all layers and calls) and attention time (CUDA events around
    every layer's attention call, selection / index building included) of the run, after one warm-up sample.
Rows are JSON lines: {"bench": "testbed_eval", "method", "task", "length", "depth", "accuracy", "n", ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sgl_slim.testbed import append_jsonl
from sgl_slim.testbed.attn import parse_method, use_method
from sgl_slim.testbed.data import Pieces, corpus_stream, eval_samples, sample_rng

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def answer_correct(logits: torch.Tensor, ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[bool]:
    """Per answer span [s, e): all of ids[s:e] are the argmax of logits[s-1:e-1].  logits [L, V], ids [L]."""
    return [bool((logits[s - 1:e - 1].argmax(-1) == ids[s:e]).all()) for s, e in spans]


def _answer_logits(model, ids: torch.Tensor, spans) -> torch.Tensor:
    """Logits [L, V] with only the rows that predict answer tokens filled (the LM head on those rows only)."""
    hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
    rows = torch.cat([torch.arange(s - 1, e - 1) for s, e in spans]).to(ids.device)
    logits = torch.zeros(ids.shape[0], model.config.vocab_size, device=ids.device)
    logits[rows] = model.lm_head(hidden[rows]).float()
    return logits


@torch.no_grad()
def score_retrieval(model, samples, device) -> list[bool]:
    """One forward per sample; True where its (single) answer is retrieved exactly."""
    out = []
    for s in samples:
        ids = torch.tensor(s.ids, device=device)
        out.append(all(answer_correct(_answer_logits(model, ids, s.answers), ids, s.answers)))
    return out


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, device) -> float:
    """Mean next-token cross-entropy (nats/token) over ``windows`` [N, L]."""
    total, count = 0.0, 0
    for w in windows:
        ids = w.to(device)[None]
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


def heldout_windows(stream: torch.Tensor, length: int, count: int, seed: int) -> torch.Tensor:
    rng = sample_rng(seed, 104729, length)
    starts = [rng.randrange(stream.numel() - length) for _ in range(count)]
    return torch.stack([stream[s:s + length] for s in starts])


def evaluate(model, tokenizer, methods: list[str], *, lengths: list[int], tasks=("passkey", "kv"),
             depths=DEPTHS, per_depth: int = 50, loss_windows: int = 4, seed: int = 1, device="cuda",
             time_budget: float = math.inf, log=print, block_size=None, segment_size=None,
             stream: torch.Tensor | None = None) -> list[dict]:
    """Rows for every (method, length): held-out loss, retrieval accuracy per (task, depth), density, time.
    Methods run in the given order until ``time_budget`` seconds have passed (later ones get a skipped row)."""
    t0 = time.time()
    if stream is None:
        stream = corpus_stream(tokenizer, "eval", max(lengths) * (loss_windows + 4) + 1_000_000)
    pieces = Pieces(tokenizer)
    sets = {(task, L): eval_samples(stream, pieces, kind=task, length=L, depths=depths, per_depth=per_depth,
                                    seed=seed) for task in tasks for L in lengths}
    windows = {L: heldout_windows(stream, L, loss_windows, seed) for L in lengths} if loss_windows else {}
    rows = []
    for text in methods:
        method = parse_method(text, block_size=block_size, segment_size=segment_size)
        for L in lengths:
            if time.time() - t0 > time_budget:
                rows.append({"bench": "testbed_eval", "method": text, "length": L, "skipped": "time budget"})
                log(rows[-1])
                continue
            t_run = time.time()
            with use_method(model, method):            # warm-up: JIT compilation stays out of the timing
                for task in tasks:                     # (every input shape the timed run sees: kernels are
                    score_retrieval(model, sets[(task, L)][:1], device)   # specialised on sizes' divisibility)
                if loss_windows:
                    heldout_loss(model, windows[L][:1], device)
            with use_method(model, method) as run:
                loss = heldout_loss(model, windows[L], device) if loss_windows else None
                per_task = {}
                for task in tasks:
                    hits = score_retrieval(model, sets[(task, L)], device)
                    per_task[task] = hits
            base = {"bench": "testbed_eval", "method": text, "length": L, "block_size": method.block_size,
                    "segment_size": method.segment_size}
            summary = dict(base, heldout_loss=loss, density=run.density, attn_ms=run.attn_ms,
                           attn_calls=run.calls, attn_ms_per_call=run.attn_ms / max(run.calls, 1),
                           wall_s=round(time.time() - t_run, 2))
            for task, hits in per_task.items():
                summary[f"{task}_accuracy"] = sum(hits) / len(hits)
                for di, depth in enumerate(depths):
                    h = hits[di * per_depth:(di + 1) * per_depth]
                    rows.append(dict(base, task=task, depth=depth, accuracy=sum(h) / len(h), n=len(h)))
                    log(rows[-1])
            rows.append(summary)
            log(summary)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--methods", default="dense")
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("--per-depth", type=int, default=50)
    ap.add_argument("--loss-windows", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--segment-size", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=math.inf)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer  # noqa: PLC0415

    from sgl_slim.testbed.model import load_model  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = evaluate(model, tokenizer, args.methods.split(","), lengths=[int(x) for x in args.lengths.split(",")],
                    per_depth=args.per_depth, loss_windows=args.loss_windows, device=device,
                    time_budget=args.time_budget, block_size=args.block_size, segment_size=args.segment_size,
                    log=lambda r: print(json.dumps(r), flush=True))
    if args.out:
        append_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
