"""EAGLE-3 on the CPU demo: acceptance (offline simulation and as served) and decode tok/s with / without the
draft at batch 1, 4, 16, through SGLang's own EAGLE3 worker (``python -m sgl_slim.launch --eagle-draft``).

    python -m benchmarks.eagle_serve [--max-new 64] [--repeats 2]

Target: sgl_slim.spec.target_lm.ensure_eagle_target (4-layer demo, language part trained on stdlib source);
draft: sgl_slim.spec.train.ensure_eagle_draft. Greedy, ignore_eos; every speculative output is checked equal
to the plain server's (quality beside speed: lossless or the row says so).
Writes benchmarks/results/eagle_serve.jsonl and .png.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import time
from pathlib import Path

import requests
import torch

from benchmarks.harness import markdown_table, record, write_results

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 4, 16)
PORTS = {"plain": 34020, "eagle": 34021}


def eval_prompts(target_dir: Path, count: int, length: int = 32) -> list[list[int]]:
    from sgl_slim.spec.data import sample_windows, token_stream  # noqa: PLC0415

    stream = token_stream(target_dir, "eval", max_tokens=100_000)
    return sample_windows(stream, count, length, seed=7).tolist()


def offline_acceptance(target_dir: Path, draft_dir: Path, prompts: list[list[int]], max_new: int) -> list[dict]:
    from sgl_slim.spec.export import load_eagle3  # noqa: PLC0415
    from sgl_slim.spec.metrics import simulate_chain  # noqa: PLC0415
    from sgl_slim.spec.textlm import TextLM  # noqa: PLC0415

    target = TextLM.from_pretrained(target_dir).eval()
    draft = load_eagle3(draft_dir, target.embed_tokens.weight).eval()
    rows = []
    for steps in (1, 2, 3, 4, 5):
        stats = simulate_chain(target, draft, torch.tensor(prompts), max_new, steps)
        rows.append(record("eagle_offline", draft_tokens=steps, mean_acceptance_length=stats.mean_length,
                           mean_accepted=stats.mean_accepted, histogram=stats.histogram(steps + 1),
                           verifies=stats.verifies))
    return rows


def run_batch(base_url: str, prompts: list[list[int]], max_new: int) -> tuple[float, list[dict]]:
    def one(ids):
        body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": max_new,
                                                       "ignore_eos": True}}
        r = requests.post(f"{base_url}/generate", json=body, timeout=1800)
        r.raise_for_status()
        return r.json()

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        out = list(ex.map(one, prompts))
    return time.perf_counter() - t0, out


def served_acceptance(metas: list[dict]) -> dict:
    """Acceptance as SGLang served it, from the responses' ``meta_info``: the mean of its per-request
    ``spec_accept_length`` (completion tokens / verifies: the prefill's token counted too), accepted drafts per
    verify over all requests (plus 1: tokens per target forward, ``simulate_chain``'s acceptance length) and the
    accepted-drafts histogram summed over the requests."""
    verifies = sum(m["spec_verify_ct"] for m in metas)
    accepted = sum(m["spec_num_correct_drafts"] for m in metas)
    histograms = [m["spec_correct_drafts_histogram"] for m in metas if m.get("spec_correct_drafts_histogram")]
    return {"mean_accept_length": statistics.mean(m["spec_accept_length"] for m in metas),
            "accepted_per_verify": accepted / verifies, "verifies": verifies,
            "accepted_drafts_histogram": [sum(h) for h in zip(*histograms)]}


def serve(kind: str, target_dir: Path, draft_dir: Path, prompts: list[list[int]], max_new: int, repeats: int):
    from sgl_slim.bench.runner import LaunchedServer  # noqa: PLC0415

    args = ["--model-path", str(target_dir), "--dtype", "float32", "--max-total-tokens", "32768"]
    if kind == "eagle":
        args += ["--eagle-draft", str(draft_dir), "--eagle-steps", "3", "--eagle-draft-tokens", "4"]
    results = {}
    with LaunchedServer(args, port=PORTS[kind]) as srv:
        run_batch(srv.base_url, prompts[:2], 8)                                      # warm-up
        for bs in BATCHES:
            times, outs = [], None
            for _ in range(repeats):
                wall, outs = run_batch(srv.base_url, prompts[:bs], max_new)
                times.append(wall)
            results[bs] = (statistics.median(times), outs)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from sgl_slim.spec.target_lm import ensure_eagle_target  # noqa: PLC0415
    from sgl_slim.spec.train import ensure_eagle_draft  # noqa: PLC0415

    draft_dir = ensure_eagle_draft(progress=True)
    target_dir = ensure_eagle_target()
    prompts = eval_prompts(target_dir, max(BATCHES))
    rows = offline_acceptance(target_dir, draft_dir, prompts, args.max_new)
    served = {kind: serve(kind, target_dir, draft_dir, prompts, args.max_new, args.repeats)
              for kind in ("plain", "eagle")}
    for bs in BATCHES:
        (t_plain, plain), (t_eagle, eagle) = served["plain"][bs], served["eagle"][bs]
        tokens = sum(len(r["output_ids"]) for r in eagle)
        equal = all(a["output_ids"] == b["output_ids"] for a, b in zip(plain, eagle))
        rows.append(record(
            "eagle_serve", batch=bs, max_new_tokens=args.max_new, tokens=tokens,
            plain_tok_s=tokens / t_plain, eagle_tok_s=tokens / t_eagle, speedup=t_plain / t_eagle,
            lossless=equal, **served_acceptance([r["meta_info"] for r in eagle])))
    path = write_results(RESULTS / "eagle_serve.jsonl", rows)
    print(markdown_table([r for r in rows if r["bench"] == "eagle_offline"],
                         ["draft_tokens", "mean_acceptance_length", "mean_accepted", "histogram"]))
    print(markdown_table([r for r in rows if r["bench"] == "eagle_serve"],
                         ["batch", "plain_tok_s", "eagle_tok_s", "speedup", "lossless", "mean_accept_length",
                          "accepted_per_verify", "accepted_drafts_histogram"]))
    plot(rows)
    print(f"wrote {path}")


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    off = next(r for r in rows if r["bench"] == "eagle_offline" and r["draft_tokens"] == 3)
    a.bar(range(1, len(off["histogram"]) + 1), off["histogram"])
    a.set_xlabel("acceptance length (tokens per verify), 3 draft tokens")
    a.set_ylabel("verify steps")
    a.set_title(f"mean {off['mean_acceptance_length']:.2f}")
    serve_rows = [r for r in rows if r["bench"] == "eagle_serve"]
    x = range(len(serve_rows))
    a2 = [r["plain_tok_s"] for r in serve_rows]
    b2 = [r["eagle_tok_s"] for r in serve_rows]
    b.bar([i - 0.2 for i in x], a2, 0.4, label="plain")
    b.bar([i + 0.2 for i in x], b2, 0.4, label="EAGLE-3 (3 draft tokens)")
    b.set_xticks(list(x), [f"batch {r['batch']}" for r in serve_rows])
    b.set_ylabel("decode tok/s (CPU, 2 cores)")
    b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "eagle_serve.png", dpi=100)


if __name__ == "__main__":
    main()
