"""Command line of ``python -m sgl_slim.bench``.

    python -m sgl_slim.bench --base-url http://127.0.0.1:30000 --scenario mixed --num-requests 64
    python -m sgl_slim.bench --launch "--model demo --dtype float32" --scenario image,video,text
    python -m sgl_slim.bench --compare "--model demo" "--recipe demo" --scenario image --output r.json
    python -m sgl_slim.bench --compare-urls http://127.0.0.1:30001 http://127.0.0.1:30002 --scenario text
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from sgl_slim.bench.runner import LaunchedServer, run_workload
from sgl_slim.bench.stats import summarize
from sgl_slim.bench.workload import MIXED_KINDS, SCENARIOS, WorkloadSpec, build_workload, scenario_kinds

TABLE_METRICS = [  # (key, label, format)
    ("completed", "completed", "{:.0f}"), ("failed", "failed", "{:.0f}"),
    ("req_per_s", "req/s", "{:.3f}"), ("output_tok_per_s", "output tok/s", "{:.1f}"),
    ("ttft_ms_p50", "TTFT p50 ms", "{:.1f}"), ("ttft_ms_p90", "TTFT p90 ms", "{:.1f}"),
    ("ttft_ms_p99", "TTFT p99 ms", "{:.1f}"), ("itl_ms_p50", "ITL p50 ms", "{:.1f}"),
    ("itl_ms_p90", "ITL p90 ms", "{:.1f}"), ("itl_ms_p99", "ITL p99 ms", "{:.1f}"),
    ("tpot_ms_mean", "TPOT mean ms", "{:.1f}"), ("prompt_tokens_mean", "prompt tokens/req", "{:.1f}"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sgl_slim.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:30000")
    target.add_argument("--launch", metavar="ARGS", help="start `python -m sgl_slim.launch ARGS` for the run")
    target.add_argument("--compare", nargs=2, metavar=("ARGS_OFF", "ARGS_ON"),
                        help="launch two servers in turn (toggles off, then on), same workload, one table")
    target.add_argument("--compare-urls", nargs=2, metavar=("URL_OFF", "URL_ON"),
                        help="like --compare, against two running servers")
    p.add_argument("--scenario", default="mixed",
                   help=f"comma-separated, each one of {', '.join(SCENARIOS)} (default: mixed = text, image and "
                        "audio, those the model takes)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals per second (default inf: all requests at once, capped by --concurrency)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request (EOS ignored)")
    p.add_argument("--text-words", type=int, default=WorkloadSpec.text_words)
    p.add_argument("--longctx-words", type=int, default=WorkloadSpec.longctx_words)
    p.add_argument("--image-size", type=int, default=WorkloadSpec.image_size)
    p.add_argument("--images-per-request", type=int, default=WorkloadSpec.images_per_request)
    p.add_argument("--audio-seconds", type=float, default=WorkloadSpec.audio_seconds)
    p.add_argument("--video-frames", type=int, default=WorkloadSpec.video_frames)
    p.add_argument("--warmup", type=int, default=1, help="untimed requests of each kind before each scenario")
    p.add_argument("--launch-port", type=int, default=0, help="port of a launched server (0: any free one)")
    p.add_argument("--output", type=Path, help="write the results (JSON) here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _model_kinds(base_url: str) -> tuple[str, ...]:
    import requests  # noqa: PLC0415

    info = requests.get(base_url.rstrip("/") + "/model_info", timeout=30).json()
    kinds = ["text"]
    if info.get("has_image_understanding"):
        kinds += ["image", "video"]         # SGLang reports no video flag; its image models here take both
    if info.get("has_audio_understanding"):
        kinds.append("audio")
    return tuple(kinds)


def _run_label(label: str, server_args: str | None, base_url: str, scenarios: list[str], args) -> list[dict]:
    spec = WorkloadSpec(max_tokens=args.max_tokens, text_words=args.text_words, longctx_words=args.longctx_words,
                        image_size=args.image_size, images_per_request=args.images_per_request,
                        audio_seconds=args.audio_seconds, video_frames=args.video_frames)
    supported = _model_kinds(base_url) + ("longctx",)
    runs = []
    for scenario in scenarios:
        mixed = tuple(k for k in MIXED_KINDS if k in supported)
        missing = [k for k in scenario_kinds(scenario, mixed) if k not in supported]
        if missing:
            raise SystemExit(f"error: scenario {scenario!r} needs {missing}, which the model at {base_url} does "
                             f"not take (it takes {', '.join(supported)})")
        if args.warmup > 0:
            warm = [r for k in scenario_kinds(scenario, mixed)
                    for r in build_workload(k, args.warmup, seed=args.seed + 10_000, spec=spec)]
            asyncio.run(run_workload(base_url, warm, concurrency=args.concurrency, progress=False))
        workload = build_workload(scenario, args.num_requests, seed=args.seed, spec=spec, mixed_kinds=mixed)
        print(f"[{label}] {scenario}: {len(workload)} requests, concurrency {args.concurrency}, "
              f"rate {args.request_rate} req/s", file=sys.stderr)
        results, duration = asyncio.run(run_workload(
            base_url, workload, concurrency=args.concurrency, request_rate=args.request_rate, seed=args.seed,
            progress=not args.no_progress))
        runs.append({"label": label, "server_args": server_args, "base_url": base_url, "scenario": scenario,
                     "kinds": list(scenario_kinds(scenario, mixed)), "summary": summarize(results, duration),
                     "requests": [r.to_json() for r in results]})
    return runs


def format_table(runs: list[dict]) -> str:
    """One markdown table: a row per metric, a column per (scenario, label); with exactly two labels, a
    change column per scenario (on vs off) and, for prompt tokens, the tokens saved."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    by = {(r["scenario"], r["label"]): r["summary"] for r in runs}
    header = ["metric"]
    for s in scenarios:
        header += [f"{s} {lab}" for lab in labels]
        if len(labels) == 2:
            header.append(f"{s} change")
    rows = []
    for key, name, fmt in TABLE_METRICS:
        row = [name]
        for s in scenarios:
            vals = [by.get((s, lab), {}).get(key, math.nan) for lab in labels]
            row += [fmt.format(v) for v in vals]
            if len(labels) == 2:
                a, b = vals
                if key == "prompt_tokens_mean":
                    row.append(f"{a - b:+.1f} saved")
                elif key in ("completed", "failed"):
                    row.append("")
                else:
                    row.append(f"{(b / a - 1) * 100:+.1f}%" if a else "")
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _environment() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_sha": sha,
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
            "python": platform.python_version(), "command": shlex.join(["python", "-m", "sgl_slim.bench",
                                                                        *sys.argv[1:]])}


def write_plot(runs: list[dict], path: Path) -> bool:
    """Bars of output tok/s and TTFT p50/p99 per (scenario, label). False if matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    names = [f"{r['scenario']}\n{r['label']}" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(runs)) * 2, 4))
    axes[0].bar(names, [r["summary"]["output_tok_per_s"] for r in runs])
    axes[0].set_ylabel("output tok/s")
    x = range(len(runs))
    axes[1].bar([i - 0.2 for i in x], [r["summary"]["ttft_ms_p50"] for r in runs], width=0.4, label="p50")
    axes[1].bar([i + 0.2 for i in x], [r["summary"]["ttft_ms_p99"] for r in runs], width=0.4, label="p99")
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("TTFT ms")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad or not scenarios:
        build_parser().error(f"--scenario: unknown {bad} (known: {', '.join(SCENARIOS)})")
    for name in ("num_requests", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.request_rate > 0:
        build_parser().error("--request-rate must be > 0 (inf: no pacing)")
    runs = []
    if args.base_url:
        runs += _run_label("server", None, args.base_url, scenarios, args)
    elif args.compare_urls:
        for label, url in zip(("off", "on"), args.compare_urls):
            runs += _run_label(label, None, url, scenarios, args)
    else:
        targets = [("server", args.launch)] if args.launch else list(zip(("off", "on"), args.compare))
        for label, server_args in targets:
            print(f"[{label}] starting python -m sgl_slim.launch {server_args}", file=sys.stderr)
            with LaunchedServer(server_args, port=args.launch_port) as srv:
                runs += _run_label(label, server_args, srv.base_url, scenarios, args)
    table = format_table(runs)
    print(table)
    failed = sum(r["summary"]["failed"] for r in runs)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"environment": _environment(), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "table": table, "runs": runs}, indent=1))
        print(f"results: {args.output}", file=sys.stderr)
    if args.plot:
        if write_plot(runs, args.plot):
            print(f"plot: {args.plot}", file=sys.stderr)
        else:
            print("plot skipped: matplotlib is not installed", file=sys.stderr)
    if failed:
        print(f"{failed} request(s) failed; first errors: "
              f"{[e for r in runs for e in r['summary']['errors']][:3]}", file=sys.stderr)
    return 1 if failed else 0
