"""IDPruner through SGLang on a Qwen2.5-VL-7B-shape model: TTFT and requests/s of 4-image prompts, pruned
(the server's ``--idpruner-keep-ratio``, 0.25) against unpruned (the same server, each request sending
``{"sgl_slim": {"idpruner_keep_ratio": 1.0}}``), side by side in one run.

The model is built locally with random weights (``sgl_slim.random_vl``: the 7B's vision tower and language model
at their real sizes, the demo's 2,048-token vocabulary; ``--tiny``: the same architecture at demo sizes, for a
CPU dry run). ONE server is started by ``python -m sgl_slim.launch --idpruner`` (radix cache off; on a GPU host
without sgl_kernel's compiled library the launcher's GPU stand-in mode, with Triton attention for the language
model and the vision tower and no CUDA graphs). Every prompt carries ``--images`` distinct generated JPEG
images of ``--image-size`` pixels square and a short question, as a ``/generate`` request with the model's chat
format; a prompt is sent once per setting, and no image is sent twice with the same setting, so the
embedding cache never skips the vision tower.

Phases (each JSON line is written as it is measured; a run cut short keeps what it measured):

1. ``warmup``: one prompt per setting (SGLang's JIT and Triton kernels compile on first use), then
   ``--concurrency`` copies of it at once per setting (batched shapes).
2. ``ttft``: ``--ttft-prompts`` prompts, one request at a time, the two settings alternating (the first one
   alternating too); TTFT is the time to the first streamed chunk, ``max_new_tokens`` = ``--max-new``.
3. ``rps``: ``--rps-requests`` prompts per setting at ``--concurrency`` requests in flight, unpruned first; requests/s
   is the count over the wall time of the block; per-request TTFT and latency under load beside it.
4. ``summary``: medians, the two ratios (unpruned / pruned TTFT, pruned / unpruned requests/s), prompt and vision
   token counts (``meta_info``), and the goals (TTFT >= 2.5x lower, requests/s >= 2x).

Usage (on the GPU host after scripts/gpu_install.sh; scripts/gpu_idpruner_bench.sh does both):

    python -m benchmarks.idpruner_gpu --out OUT/idpruner_gpu.jsonl --logs OUT [--tiny]
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness import env_info, stream_generate, wave_image
from sgl_slim.bench.runner import LaunchedServer

UNPRUNED, PRUNED = "unpruned", "pruned"
QUESTION = "Compare these pictures and describe what changes between them."
TTFT_GOAL, RPS_GOAL = 2.5, 2.0


def image_data_url(seed: int, size: int) -> str:
    """A seeded RGB JPEG (:func:`benchmarks.harness.wave_image`) as a data URL."""
    return "data:image/jpeg;base64," + base64.b64encode(wave_image(seed, size, "JPEG")).decode()


def prompt_text(n_images: int) -> str:
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            + "<|vision_start|><|image_pad|><|vision_end|>" * n_images
            + QUESTION + "<|im_end|>\n<|im_start|>assistant\n")


def request_body(images: list[str], setting: str, max_new: int) -> dict:
    body = {"text": prompt_text(len(images)), "image_data": images, "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}}
    if setting == UNPRUNED:
        body["sgl_slim"] = {"idpruner_keep_ratio": 1.0}
    return body


def measure_request(base_url: str, body: dict, timeout_s: float) -> dict:
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
    return {"ok": True, "ttft_s": round(ttft, 4), "latency_s": round(latency, 4),
            "prompt_tokens": meta.get("prompt_tokens"), "completion_tokens": meta.get("completion_tokens"),
            "vision_tokens_kept": slim.get("vision_tokens_kept"),
            "vision_tokens_total": slim.get("vision_tokens_total"),
            "idpruner_keep_ratio": slim.get("idpruner_keep_ratio")}


def server_flags(model: Path, args) -> list[str]:
    flags = ["--model-path", str(model), "--idpruner", "--idpruner-keep-ratio", str(args.keep),
             "--disable-radix-cache"]
    if args.tiny:
        return flags + ["--dtype", "float32"]
    # the stand-in mode's attention for both towers (SGLang's vision default on Hopper is FA3, compiled)
    return flags + ["--dtype", "bfloat16", "--attention-backend", "triton", "--mm-attention-backend", "triton_attn",
                    "--disable-cuda-graph", "--mem-fraction-static", str(args.mem_fraction)]


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get("ok") and r.get(key) is not None]
    return round(statistics.median(vals), 4) if vals else None


def summarize(ttft_rows: dict, rps_rows: dict) -> dict:
    out = {"kind": "summary"}
    for setting in (UNPRUNED, PRUNED):
        rows = ttft_rows.get(setting, [])
        out[setting] = {
            "ttft_median_s": _median(rows, "ttft_s"), "latency_median_s": _median(rows, "latency_s"),
            "prompt_tokens": _median(rows, "prompt_tokens"),
            "vision_tokens_kept": _median(rows, "vision_tokens_kept"),
            "vision_tokens_total": _median(rows, "vision_tokens_total"),
            "ttft_requests_ok": sum(r.get("ok", False) for r in rows),
            "requests_per_s": rps_rows.get(setting, {}).get("requests_per_s")}
    u, p = out[UNPRUNED], out[PRUNED]
    out["ttft_speedup"] = round(u["ttft_median_s"] / p["ttft_median_s"], 3) \
        if u["ttft_median_s"] and p["ttft_median_s"] else None
    out["rps_speedup"] = round(p["requests_per_s"] / u["requests_per_s"], 3) \
        if u["requests_per_s"] and p["requests_per_s"] else None
    out["goal_ttft_2.5x"] = None if out["ttft_speedup"] is None else out["ttft_speedup"] >= TTFT_GOAL
    out["goal_rps_2x"] = None if out["rps_speedup"] is None else out["rps_speedup"] >= RPS_GOAL
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON lines file (appended)")
    ap.add_argument("--logs", required=True, help="folder for the server's log")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a dry run of the logic)")
    ap.add_argument("--model-dir", default=None, help="where the model is built (reused if complete)")
    ap.add_argument("--keep", type=float, default=0.25, help="the server's --idpruner-keep-ratio")
    ap.add_argument("--images", type=int, default=4, help="images per prompt")
    ap.add_argument("--image-size", type=int, default=None, help="square images, pixels (896; tiny 224)")
    ap.add_argument("--ttft-prompts", type=int, default=None, help="prompts timed one at a time (6; tiny 2)")
    ap.add_argument("--rps-requests", type=int, default=None, help="requests per setting for requests/s (32; tiny 4)")
    ap.add_argument("--concurrency", type=int, default=None, help="requests in flight for requests/s (8; tiny 2)")
    ap.add_argument("--max-new", type=int, default=16, help="new tokens per request (ignore_eos)")
    ap.add_argument("--mem-fraction", type=float, default=0.7, help="GPU: SGLang's --mem-fraction-static")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="skip the phases not started once this much time has passed since the start")
    ap.add_argument("--startup-timeout", type=float, default=270.0)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.image_size = args.image_size or (224 if tiny else 896)
    args.ttft_prompts = args.ttft_prompts or (2 if tiny else 6)
    args.rps_requests = args.rps_requests or (4 if tiny else 32)
    args.concurrency = args.concurrency or (2 if tiny else 8)
    shape = "tiny" if tiny else "7b"
    model_dir = Path(args.model_dir or f"/tmp/sgl_slim_random_vl_{shape}")
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

    from sgl_slim.random_vl import SHAPES, build_random_vl  # noqa: PLC0415

    n_prompts = 1 + args.ttft_prompts + args.rps_requests       # warm-up, TTFT, requests/s
    # the images are drawn on a few threads while the model is built (mostly file writes)
    image_pool = ThreadPoolExecutor(max_workers=4)
    image_futures = [[image_pool.submit(image_data_url, 1000 * p + i, args.image_size) for i in range(args.images)]
                     for p in range(n_prompts)]
    t0 = time.perf_counter()
    complete = model_dir / ".complete"
    reused = complete.is_file() and complete.read_text().strip() == shape
    if not reused:
        device = "cpu" if tiny else "cuda"
        build_random_vl(model_dir, shape, device=device)
        complete.write_text(shape + "\n")
        if device == "cuda":
            torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    prompts = [[f.result() for f in fs] for fs in image_futures]
    image_pool.shutdown()
    emit({"kind": "setup", "env": env_info(), "model": {"shape": shape, **SHAPES[shape], "weights": "random (seed 0)",
          "vocab": "demo BPE, 2048 tokens"}, "model_dir": str(model_dir), "model_reused": reused,
          "build_s": round(build_s, 1), "images_ready_s": round(time.perf_counter() - t0, 1),
          "keep_ratio": args.keep, "images_per_prompt": args.images, "image_size": args.image_size,
          "ttft_prompts": args.ttft_prompts, "rps_requests": args.rps_requests, "concurrency": args.concurrency,
          "max_new_tokens": args.max_new, "radix_cache": "off"})

    flags = server_flags(model_dir, args)
    env = {} if tiny else {"TORCH_COMPILE_DISABLE": "1"}   # SGLang's torch.compile'd vision rope runs eagerly
    server = LaunchedServer(flags, log_path=logs / "idp_server.log", env=env)
    servers.append(server)
    ttft_rows: dict[str, list] = {UNPRUNED: [], PRUNED: []}
    rps_rows: dict[str, dict] = {}
    try:
        t0 = time.perf_counter()
        server.start()
        server.wait_ready(timeout=max(30.0, min(args.startup_timeout, left_s())))
        emit({"kind": "ready", "flags": flags, "ready_s": round(time.perf_counter() - t0, 1)})
        url = server.base_url

        def one(images, setting):
            return measure_request(url, request_body(images, setting, args.max_new), args.request_timeout)

        for setting in (UNPRUNED, PRUNED):
            emit({"kind": "warmup", "setting": setting, **one(prompts[0], setting)})
        for setting in (UNPRUNED, PRUNED):    # batched shapes too (the same images: the embedding cache may hit)
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
                results = list(pool.map(lambda imgs, s=setting: one(imgs, s), rps_prompts))
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
    summary = summarize(ttft_rows, rps_rows)
    emit({**summary, "total_s": round(time.perf_counter() - t_start, 1)})
    ok = summary["ttft_speedup"] is not None and summary["rps_speedup"] is not None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
