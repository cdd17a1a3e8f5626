"""One SGLang server with a token-pruning toggle on, requests with it off (sent per request) beside requests with
the server's setting: TTFT one at a time and requests/s under load, side by side in one run.  The workloads are
``benchmarks.idpruner_gpu`` (4-image prompts, Qwen2.5-VL-7B shape) and ``benchmarks.samp_gpu`` (30 s clips,
Qwen2-Audio-7B shape); this module holds what they share: the phases, the measurement of one streamed request,
the summary and the command line.

Phases (each JSON line is written as it is measured; a run cut short keeps what it measured):

1. ``warmup``: one prompt per setting (SGLang's JIT and Triton kernels compile on first use), then
   ``--concurrency`` copies of it at once per setting (batched shapes).
2. ``ttft``: ``--ttft-prompts`` prompts, one request at a time, the two settings alternating (the first one
   alternating too); TTFT is the time to the first streamed chunk, ``max_new_tokens`` = ``--max-new``.
3. ``rps``: ``--rps-requests`` prompts per setting at ``--concurrency`` requests in flight, unpruned first;
   requests/s is the count over the wall time of the block; per-request TTFT and latency under load beside it.
4. ``summary``: medians, the two ratios (unpruned / pruned TTFT, pruned / unpruned requests/s), prompt and
   media token counts (``meta_info``), and the workload's goals where it has them.

Where TTFT goes: the server runs with ``--enable-metrics``, whose ``meta_info`` timestamps split each request
(``benchmarks.harness.REQUEST_PHASES``): ``preprocess_s`` (received -> handed to the scheduler: media decoding,
the HF processor, the tokenizer-side hooks), ``to_forward_s`` (-> its forward pass starts: transfer and
queueing) and ``prefill_s`` (the forward that ends its prefill: the encoder, the pruning and the language
model's prefill).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.harness import REQUEST_PHASES, env_info, request_phases, stream_generate
from sgl_slim.bench.runner import LaunchedServer

UNPRUNED, PRUNED = "unpruned", "pruned"


@dataclass(frozen=True)
class Workload:
    name: str                      # the log's file name: {name}_server.log
    media: str                     # "vision" | "audio": meta_info's {media}_tokens_kept / _total
    shapes: dict                                               # shape name -> the model's sizes (setup line)
    build_model: Callable[..., object]                         # (dir, shape, device=...): sgl_slim.random_vl
    make_media: Callable[[int, argparse.Namespace], str]       # (seed, args) -> one data URL
    request_body: Callable[[list, str, int], dict]             # (media of one prompt, setting, max_new)
    server_flags: Callable[[Path, argparse.Namespace], list]
    add_args: Callable[[argparse.ArgumentParser], None]
    tiny_defaults: dict = field(default_factory=dict)          # argument defaults of the CPU dry run
    gpu_defaults: dict = field(default_factory=dict)
    goals: dict = field(default_factory=dict)                  # {"ttft": x, "rps": y}: speed-up goals, if any


def server_flags(model: Path, args: argparse.Namespace, toggle: list[str], gpu: tuple = ()) -> list[str]:
    """The server's flags: the toggle's own, the radix cache off, fp32 for the CPU dry run; on a GPU the stand-in
    mode's Triton attention without CUDA graphs (plus ``gpu``, the workload's own there)."""
    flags = ["--model-path", str(model), *toggle, "--disable-radix-cache", "--enable-metrics"]
    if args.tiny:
        return flags + ["--dtype", "float32"]
    return flags + ["--dtype", "bfloat16", "--attention-backend", "triton", *gpu, "--disable-cuda-graph",
                    "--mem-fraction-static", str(args.mem_fraction)]


def measure_request(base_url: str, body: dict, timeout_s: float, media: str) -> dict:
    """One streaming ``/generate`` request: ok, TTFT (first chunk), latency and the token counts of the last
    chunk's ``meta_info``; a failure is recorded, not raised."""
    t0 = time.perf_counter()
    try:
        ttft, latency, last = stream_generate(base_url, body, timeout_s)
    except Exception as exc:  # noqa: BLE001 (recorded per request; the run goes on)
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                "latency_s": time.perf_counter() - t0}
    meta = (last or {}).get("meta_info", {})
    if ttft is None or not meta:
        return {"ok": False, "error": f"no streamed chunk with meta_info: {str(last)[:300]}", "latency_s": latency}
    if "error" in (last or {}):
        return {"ok": False, "error": str(last["error"])[:300], "latency_s": latency}
    slim = meta.get("sgl_slim", {})
    row = {"ok": True, "ttft_s": round(ttft, 4), "latency_s": round(latency, 4),
           "prompt_tokens": meta.get("prompt_tokens"), "completion_tokens": meta.get("completion_tokens"),
           f"{media}_tokens_kept": slim.get(f"{media}_tokens_kept"),
           f"{media}_tokens_total": slim.get(f"{media}_tokens_total")}
    row.update({k: v for k, v in slim.items() if k.endswith("_keep_ratio")})
    row.update(request_phases(meta))
    return row


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get("ok") and r.get(key) is not None]
    return round(statistics.median(vals), 4) if vals else None


def summarize(ttft_rows: dict, rps_rows: dict, media: str, goals: dict) -> dict:
    out = {"kind": "summary"}
    for setting in (UNPRUNED, PRUNED):
        rows = ttft_rows.get(setting, [])
        out[setting] = {
            "ttft_median_s": _median(rows, "ttft_s"), "latency_median_s": _median(rows, "latency_s"),
            "prompt_tokens": _median(rows, "prompt_tokens"),
            f"{media}_tokens_kept": _median(rows, f"{media}_tokens_kept"),
            f"{media}_tokens_total": _median(rows, f"{media}_tokens_total"),
            **{f"{name}_median": _median(rows, name) for name, _, _ in REQUEST_PHASES},
            "ttft_requests_ok": sum(r.get("ok", False) for r in rows),
            "requests_per_s": rps_rows.get(setting, {}).get("requests_per_s")}
    u, p = out[UNPRUNED], out[PRUNED]
    out["ttft_speedup"] = round(u["ttft_median_s"] / p["ttft_median_s"], 3) \
        if u["ttft_median_s"] and p["ttft_median_s"] else None
    out["rps_speedup"] = round(p["requests_per_s"] / u["requests_per_s"], 3) \
        if u["requests_per_s"] and p["requests_per_s"] else None
    for key, goal in goals.items():
        got = out[f"{key}_speedup"]
        out[f"goal_{key}_{goal:g}x"] = None if got is None else got >= goal
    return out


def parse_args(work: Workload, argv: list[str] | None, description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True, help="JSON lines file (appended)")
    ap.add_argument("--logs", required=True, help="folder for the server's log")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a dry run of the logic)")
    ap.add_argument("--model-dir", default=None, help="where the model is built (reused if complete)")
    ap.add_argument("--ttft-prompts", type=int, default=None, help="prompts timed one at a time (6; tiny 2)")
    ap.add_argument("--rps-requests", type=int, default=None, help="requests per setting for requests/s (32; tiny 4)")
    ap.add_argument("--concurrency", type=int, default=None, help="requests in flight for requests/s (8; tiny 2)")
    ap.add_argument("--max-new", type=int, default=16, help="new tokens per request (ignore_eos)")
    ap.add_argument("--mem-fraction", type=float, default=0.7, help="GPU: SGLang's --mem-fraction-static")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="skip the phases not started once this much time has passed since the start")
    ap.add_argument("--startup-timeout", type=float, default=270.0)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    work.add_args(ap)
    args = ap.parse_args(argv)
    defaults = {"ttft_prompts": 6, "rps_requests": 32, "concurrency": 8, **work.gpu_defaults}
    if args.tiny:
        defaults.update({"ttft_prompts": 2, "rps_requests": 4, "concurrency": 2, **work.tiny_defaults})
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def run(work: Workload, argv: list[str] | None, description: str) -> int:
    args = parse_args(work, argv, description)
    shape = "tiny" if args.tiny else "7b"
    model_dir = Path(args.model_dir or f"/tmp/sgl_slim_random_{work.name}_{shape}")
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    t_start = time.perf_counter()
    lock = threading.Lock()
    servers: list[LaunchedServer] = []

    def on_sigterm(*_):   # a hard timeout: stop the server (its own process group) first, then exit
        for srv in servers:
            srv.stop()
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)

    def emit(row: dict) -> None:
        row = {"t_s": round(time.perf_counter() - t_start, 1), **row}
        with lock:
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def left_s() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    import torch  # noqa: PLC0415

    n_prompts = 1 + args.ttft_prompts + args.rps_requests       # warm-up, TTFT, requests/s
    per_prompt = args.per_prompt
    # the media are made on a few threads while the model is built (mostly file writes)
    media_pool = ThreadPoolExecutor(max_workers=4)
    media_futures = [[media_pool.submit(work.make_media, 1000 * p + i, args) for i in range(per_prompt)]
                     for p in range(n_prompts)]
    t0 = time.perf_counter()
    complete = model_dir / ".complete"
    reused = complete.is_file() and complete.read_text().strip() == shape
    if not reused:
        device = "cpu" if args.tiny else "cuda"
        work.build_model(model_dir, shape, device=device)
        complete.write_text(shape + "\n")
        if device == "cuda":
            torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    prompts = [[f.result() for f in fs] for fs in media_futures]
    media_pool.shutdown()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "logs", "model_dir", "startup_timeout",
                                                                 "request_timeout", "budget_s")}
    model = {"shape": shape, **work.shapes[shape], "weights": "random (seed 0)", "vocab": "demo BPE, 2048 tokens"}
    emit({"kind": "setup", "env": env_info(), "model": model, "model_dir": str(model_dir),
          "model_reused": reused, "build_s": round(build_s, 1), "media_ready_s": round(time.perf_counter() - t0, 1),
          **settings, "radix_cache": "off"})

    flags = work.server_flags(model_dir, args)
    env = {} if args.tiny else {"TORCH_COMPILE_DISABLE": "1"}   # SGLang's torch.compile'd parts run eagerly
    server = LaunchedServer(flags, log_path=logs / f"{work.name}_server.log", env=env)
    servers.append(server)
    ttft_rows: dict[str, list] = {UNPRUNED: [], PRUNED: []}
    rps_rows: dict[str, dict] = {}
    try:
        t0 = time.perf_counter()
        server.start()
        server.wait_ready(timeout=max(30.0, min(args.startup_timeout, left_s())))
        emit({"kind": "ready", "flags": flags, "ready_s": round(time.perf_counter() - t0, 1)})
        url = server.base_url

        def one(media, setting):
            return measure_request(url, work.request_body(media, setting, args.max_new), args.request_timeout,
                                   work.media)

        for setting in (UNPRUNED, PRUNED):
            emit({"kind": "warmup", "setting": setting, **one(prompts[0], setting)})
        for setting in (UNPRUNED, PRUNED):    # batched shapes too (the same media: the embedding cache may hit)
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                results = list(pool.map(lambda _, s=setting: one(prompts[0], s), range(args.concurrency)))
            emit({"kind": "warmup_batch", "setting": setting, "requests": len(results),
                  "ok": sum(r["ok"] for r in results), "errors": sorted({r["error"] for r in results
                                                                         if not r["ok"]})[:3]})
        for p in range(args.ttft_prompts):
            if left_s() < 0:
                emit({"kind": "skipped", "phase": "ttft", "prompt": p, "why": "time budget"})
                break
            order = (UNPRUNED, PRUNED) if p % 2 == 0 else (PRUNED, UNPRUNED)
            for setting in order:
                res = one(prompts[1 + p], setting)
                ttft_rows[setting].append(res)
                emit({"kind": "ttft", "setting": setting, "prompt": p, **res})
        rps_prompts = prompts[1 + args.ttft_prompts:]
        for setting in (UNPRUNED, PRUNED):
            if left_s() < 0:
                emit({"kind": "skipped", "phase": "rps", "setting": setting, "why": "time budget"})
                continue
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                results = list(pool.map(lambda m, s=setting: one(m, s), rps_prompts))
            wall = time.perf_counter() - t0
            ok = [r for r in results if r["ok"]]
            rps_rows[setting] = {
                "kind": "rps", "setting": setting, "requests": len(results), "ok": len(ok),
                "concurrency": args.concurrency, "wall_s": round(wall, 3),
                "requests_per_s": round(len(ok) / wall, 4) if ok else None,
                "ttft_median_s": _median(ok, "ttft_s"), "latency_median_s": _median(ok, "latency_s"),
                "prompt_tokens_median": _median(ok, "prompt_tokens"),
                "output_tokens_per_s": round(sum(r["completion_tokens"] or 0 for r in ok) / wall, 2),
                "errors": sorted({r["error"] for r in results if not r["ok"]})[:3]}
            emit(rps_rows[setting])
    except Exception as exc:  # noqa: BLE001 (recorded: the summary of what was measured still follows)
        emit({"kind": "error", "error": f"{type(exc).__name__}: {str(exc)[-2500:]}"})
    finally:
        server.stop()
    summary = summarize(ttft_rows, rps_rows, work.media, work.goals)
    emit({**summary, "total_s": round(time.perf_counter() - t_start, 1)})
    ok = summary["ttft_speedup"] is not None and summary["rps_speedup"] is not None
    return 0 if ok else 1
