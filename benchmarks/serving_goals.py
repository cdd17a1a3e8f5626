"""Issue #6's two throughput goals, stock SGLang vs sgl_slim with its toggles on, same model, same flags:

1. prompts sgl_slim cannot shrink (short text): sgl_slim may cost at most 3% requests/s;
2. image-heavy prompts at IDPruner keep 0.25: sgl_slim must finish >= 2.5x the requests/s.

    python -m benchmarks.serving_goals --out benchmarks/results/serving_goals.jsonl

The model is the demo VLM with a LARGER language model (``--hidden``/``--layers``; its vision tower stays the
demo's), so that, as in real 7B VLMs, the language model dominates the cost. Both servers run at once (the
stock one with no plugin, ``sglang.launch_server``); the workload runs in PHASES that alternate between them
(ABBA order), so the load of a shared machine, which drifts, falls on both alike. Each phase is a closed loop
of ``--requests`` requests at ``--concurrency``; requests/s per phase, the median over ``--rounds`` rounds per
server; the ratio of medians is the result. Radix cache off (every request pays its prefill); greedy; exactly
``--max-tokens`` output tokens per request. Every output of the text phases is compared between the servers
(sgl_slim must not change what text-only requests generate).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
from pathlib import Path

from benchmarks.harness import env_info, markdown_table, record, write_results
from sgl_slim.bench.runner import LaunchedServer, run_workload, running
from sgl_slim.bench.stats import summarize
from sgl_slim.bench.workload import WorkloadSpec, build_workload


def server_args(model: str) -> list[str]:
    return ["--model-path", model, "--dtype", "float32", "--disable-radix-cache", "--max-total-tokens", "32768",
            "--context-length", "4096", "--skip-server-warmup"]


def run_phase(url: str, workload, concurrency: int) -> dict:
    results, duration = asyncio.run(run_workload(url, workload, concurrency=concurrency, progress=False))
    summary = summarize(results, duration)
    summary["texts"] = [r.text for r in results]
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--images", type=int, default=4, help="images per image-heavy request")
    ap.add_argument("--image-size", type=int, default=448, help="pixels (448: 256 vision tokens per image)")
    ap.add_argument("--requests", type=int, default=8, help="requests per phase")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4, help="phases per server per scenario")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--scenarios", default="text,image")
    ap.add_argument("--port", type=int, default=30300)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # -> running() stops the servers

    from sgl_slim.demo import ensure_demo

    model = str(ensure_demo("demo", hidden_size=args.hidden, num_hidden_layers=args.layers,
                            intermediate_size=4 * args.hidden, num_attention_heads=8, num_key_value_heads=4))
    logs = Path("/tmp/sgl_slim_serving_goals")
    logs.mkdir(exist_ok=True)
    toggles = ["--s2o", "--idpruner", "--idpruner-keep-ratio", str(args.keep)]
    servers = {"stock": LaunchedServer(server_args(model), args.port, logs / "stock.log", plain=True),
               "sgl_slim": LaunchedServer(server_args(model) + toggles, args.port + 1, logs / "slim.log")}
    spec = WorkloadSpec(max_tokens=args.max_tokens, image_size=args.image_size, images_per_request=args.images)
    rows = []
    with running(servers):
        for scenario in args.scenarios.split(","):
            warm = build_workload(scenario, 2, seed=999, spec=spec)
            for srv in servers.values():
                run_phase(srv.base_url, warm, args.concurrency)
            phases = {name: [] for name in servers}
            for r in range(args.rounds):
                workload = build_workload(scenario, args.requests, seed=r, spec=spec)  # both get the same
                order = list(servers) if r % 2 == 0 else list(servers)[::-1]         # ABBA
                for name in order:
                    s = run_phase(servers[name].base_url, workload, args.concurrency)
                    s["load_avg_1m"] = os.getloadavg()[0]
                    phases[name].append(s)
                    print(f"{scenario} round {r} {name}: {s['req_per_s']:.3f} req/s, "
                          f"{s['completed']}/{s['requests']} ok, prompt {s['prompt_tokens_mean']:.1f} tok, "
                          f"load {s['load_avg_1m']:.1f}", flush=True)
            same = sum(a == b for x, y in zip(phases["stock"], phases["sgl_slim"])
                       for a, b in zip(x["texts"], y["texts"]))
            total = sum(len(x["texts"]) for x in phases["stock"])
            med = {name: statistics.median(p["req_per_s"] for p in ps) for name, ps in phases.items()}
            for name, ps in phases.items():
                rows.append(record("serving_goals", scenario=scenario, server=name, hidden=args.hidden,
                                   layers=args.layers, keep=args.keep if name == "sgl_slim" else 1.0,
                                   images=args.images if scenario == "image" else 0,
                                   requests_per_phase=args.requests, concurrency=args.concurrency,
                                   rounds=args.rounds, max_tokens=args.max_tokens,
                                   req_per_s_median=med[name], req_per_s_phases=[p["req_per_s"] for p in ps],
                                   ratio_vs_stock=med[name] / med["stock"],
                                   ttft_ms_p50=statistics.median(p["ttft_ms_p50"] for p in ps),
                                   prompt_tokens_mean=ps[0]["prompt_tokens_mean"],
                                   failed=sum(p["failed"] for p in ps),
                                   outputs_equal_to_stock=f"{same}/{total}" if scenario == "text" else "n/a",
                                   load_avg_1m=[p["load_avg_1m"] for p in ps]))
                print(rows[-1], flush=True)
    write_results(args.out, rows, env=env_info())
    print(markdown_table(rows, ["scenario", "server", "prompt_tokens_mean", "req_per_s_median", "ratio_vs_stock",
                                "ttft_ms_p50", "failed", "outputs_equal_to_stock"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
