"""LLM prefill cost at pruned vs unpruned lengths, in-process (no server), interleaved.

    python -m benchmarks.idpruner_prefill --out benchmarks/results/idpruner_prefill.jsonl

What IDPruner removes is language-model prefill work. This times the larger demo's language model (the same
checkpoint as benchmarks/idpruner_ttft.py) on inputs_embeds of the lengths the server sees for 4 images of
256 tokens plus text (1055 tokens unpruned; keep 0.5 / 0.25 / 0.1 -> 543 / 287 / 133), alternating the
lengths in every round so the shared host's load drift hits all alike. Median of the rounds. ``--lengths`` sets
other lengths, e.g. a 16-frame video's (1176 tokens; 312 at keep 0.25):
``python -m benchmarks.idpruner_prefill --lengths 1.0:1176,0.25:312 --out ...``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.harness import env_info, markdown_table, record, write_results

LENGTHS = {1.0: 1055, 0.5: 543, 0.25: 287, 0.1: 133}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: spinning threads starve on a shared host)")
    ap.add_argument("--lengths", default=",".join(f"{k}:{n}" for k, n in LENGTHS.items()),
                    help="keep:tokens,... (keep 1.0 is the baseline and must be among them)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    lengths = {float(k): int(n) for k, n in (pair.split(":") for pair in args.lengths.split(","))}
    from transformers import Qwen2_5_VLForConditionalGeneration

    from sgl_slim.demo import ensure_demo

    path = ensure_demo("demo", hidden_size=args.hidden, num_hidden_layers=args.layers,
                       intermediate_size=4 * args.hidden, num_attention_heads=8, num_key_value_heads=4)
    torch.set_num_threads(args.threads)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    lm = model.model.language_model
    times = {k: [] for k in lengths}
    with torch.no_grad():
        for r in range(args.rounds + 1):
            for keep, n in lengths.items():
                x = torch.randn(1, n, args.hidden)
                pos = torch.arange(n)[None, None].expand(3, 1, n)
                t0 = time.perf_counter()
                lm(inputs_embeds=x, position_ids=pos, use_cache=False)
                if r:                                   # round 0 warms up
                    times[keep].append(time.perf_counter() - t0)
    base = statistics.median(times[1.0])
    rows = [record("idpruner_prefill", keep_ratio=k, tokens=n, prefill_ms=1e3 * statistics.median(times[k]),
                   speedup=base / statistics.median(times[k]), rounds=args.rounds, hidden=args.hidden,
                   layers=args.layers, threads=args.threads) for k, n in lengths.items()]
    write_results(args.out, rows, env=env_info())
    print(markdown_table(rows, ["keep_ratio", "tokens", "prefill_ms", "speedup"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
