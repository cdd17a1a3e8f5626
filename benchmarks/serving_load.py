"""Full-size load run (issue 6, item 5): mixed text/image/audio requests against the CPU demo servers with all
toggles on (the `demo` and `demo-audio` recipes: IDPruner + S2O, Samp + S2O), several rounds. Image requests
go to the image server, audio requests to the audio server, text requests alternate; each server gets half of
--concurrency. Per round: failures, incomplete responses, throughput and latency, KV tokens in use after the
round (SGLang /v1/loads) and resident memory of each server's process tree.

    python benchmarks/serving_load.py --num-requests 200 --concurrency 16 --rounds 2
    python benchmarks/serving_load.py --vl-url http://127.0.0.1:30000 --audio-url http://127.0.0.1:30001

Results: benchmarks/results/serving_load.jsonl (+ a markdown table on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import env_info, markdown_table, record, write_results  # noqa: E402
from sgl_slim.bench.probes import server_rss_bytes, wait_until_idle  # noqa: E402
from sgl_slim.bench.runner import LaunchedServer, run_workload  # noqa: E402
from sgl_slim.bench.stats import summarize  # noqa: E402
from sgl_slim.bench.workload import WorkloadSpec, build_workload  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serving_load.jsonl"
COMMON = "--max-total-tokens 16384"


def split(workload):
    """Image requests to the image server, audio to the audio server, text alternately."""
    vl, audio, n_text = [], [], 0
    for req in workload:
        if req.kind == "image" or (req.kind == "text" and n_text % 2 == 0):
            vl.append(req)
        else:
            audio.append(req)
        n_text += req.kind == "text"
    return {"vl": vl, "audio": audio}


async def one_round(urls, workload, concurrency):
    parts = split(workload)
    runs = await asyncio.gather(*(run_workload(urls[k], parts[k], concurrency=max(1, concurrency // 2),
                                               progress=False) for k in parts))
    return {k: run for k, run in zip(parts, runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--vl-url", help="a running image server (default: launch `--recipe demo`)")
    p.add_argument("--audio-url", help="a running audio server (default: launch `--recipe demo-audio`)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    spec = WorkloadSpec(max_tokens=args.max_tokens, audio_seconds=2.0)
    rows = []
    with contextlib.ExitStack() as stack:
        urls = {"vl": args.vl_url, "audio": args.audio_url}
        launched = {}
        for key, recipe, port in (("vl", "demo", 35301), ("audio", "demo-audio", 35302)):
            if urls[key] is None:  # both start at once: startup dominates on the CPU
                launched[key] = LaunchedServer(f"--recipe {recipe} {COMMON}", port=port).start()
                stack.callback(launched[key].stop)
        for key, srv in launched.items():
            urls[key] = srv.wait_ready().base_url
        for rnd in range(args.rounds):
            workload = build_workload("mixed", args.num_requests, seed=rnd, spec=spec)
            runs = asyncio.run(one_round(urls, workload, args.concurrency))
            for key, (results, duration) in runs.items():
                s = summarize(results, duration)
                incomplete = sum(r.ok and r.completion_tokens != args.max_tokens for r in results)
                load = wait_until_idle(urls[key], timeout_s=60)
                rows.append(record(
                    "serving_load", round=rnd, server=key, requests=s["requests"], failed=s["failed"],
                    incomplete=incomplete, kinds=sorted({r.kind for r in results}), duration_s=duration,
                    req_per_s=s["req_per_s"], output_tok_per_s=s["output_tok_per_s"],
                    ttft_ms_p50=s["ttft_ms_p50"], ttft_ms_p99=s["ttft_ms_p99"], itl_ms_p50=s["itl_ms_p50"],
                    itl_ms_p99=s["itl_ms_p99"], prompt_tokens_mean_by_kind=s["prompt_tokens_mean_by_kind"],
                    kv_tokens_in_use_after=load["num_used_tokens"], running_after=load["num_running_reqs"],
                    rss_mib_after=server_rss_bytes(urls[key]) / 2**20, errors=s["errors"]))
                print(f"round {rnd} {key}: {s['completed']}/{s['requests']} ok, {duration:.1f} s", file=sys.stderr)
    env = env_info()
    env.update(num_requests=args.num_requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
               command=" ".join(["python", "benchmarks/serving_load.py", *sys.argv[1:]]))
    write_results(args.output, rows, env=env)
    print(markdown_table(rows, ["round", "server", "requests", "failed", "incomplete", "duration_s", "req_per_s",
                                "output_tok_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
                                "kv_tokens_in_use_after", "rss_mib_after"], floatfmt=".4g"))
    print(f"results: {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
