"""EAGLE-3 through SGLang's own EAGLE3 worker on one GPU, with CUDA graphs, against the same server without the
draft: decode tokens/s at batch 1, 4 and 16, acceptance as served, and how many outputs are identical.

    python -m benchmarks.eagle_sglang_gpu --out DIR [--sha SHA]     # the H200 run (scripts/gpu_eagle_bench.sh)
    python -m benchmarks.eagle_sglang_gpu --tiny --out DIR          # the same path on the CPU, demo-sized models

Phases (rows in DIR/eagle_sglang_gpu.jsonl, the environment first, each row written as it is measured):

1. ``target_train``: the 78.7M ``TextLM`` target of benchmarks/eagle_gpu.py, its code and config (``FULL``),
   trained here; written as a ``Qwen2ForCausalLM`` checkpoint (bf16) beside the demo BPE tokenizer. The server
   without the draft (``plain``) is started now: it loads while the draft trains.
2. ``draft_train``: the EAGLE-3 draft of benchmarks/eagle_gpu.py (same code and config, 3000 steps: only its time
   budget is raised, see ``GPU_TRAIN``), written in SGLang's EAGLE-3 format (bf16); ``offline_acceptance``:
   ``simulate_chain`` of the served draft length on the same held-out prompts (the reference for the served
   acceptance).
3. ``ready`` / ``warmup`` / ``serve``, per server: ``python -m sgl_slim.launch`` for the target (``plain``), then
   the same flags plus ``--eagle-draft`` (``eagle``: SGLang's EAGLE3 worker, chain drafting, topk 1). On a GPU:
   bf16, decode CUDA graphs for batches up to 16 (the target's decode or verify step, the draft's decode steps
   and extend), the prefill graph off; the captured graphs are read from the server's log. Greedy,
   ``ignore_eos``, ``--max-new`` tokens for each of the first ``batch`` held-out prompts sent at once;
   tokens/s = the batch's new tokens / its wall time (prefill included), median of ``--repeats``.
4. ``summary`` per batch: both speeds and their ratio, acceptance as served (accepted drafts per verify from
   ``meta_info``; SGLang's own ``spec_accept_length``), identical sequences and identical leading tokens.

``--tiny``: the same phases on the CPU with demo-sized models (hidden 64, 4 layers) trained in seconds, float32,
no CUDA graphs: a check of the whole path, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.eagle_gpu import FULL, TINY, Results, eval_prompts, log, train_eagle, train_target, versions
from benchmarks.eagle_serve import run_batch, served_acceptance
from sgl_slim.bench.runner import LaunchedServer
from sgl_slim.demo import train_tokenizer
from sgl_slim.spec.export import export_eagle3
from sgl_slim.spec.metrics import simulate_chain

NAME = "eagle_sglang_gpu"
BATCHES = (1, 4, 16)
# eagle_gpu's config; its draft budget (80 s, met by its 3000 steps in 92 s there) raised so that the plain
# server's start-up, which shares the host while the draft trains, cannot cut the step count
GPU_TRAIN = dict(FULL, draft_budget_s=150.0)
# demo-sized target and draft: enough steps that the target's greedy text is not one repeated token
TINY_TRAIN = dict(TINY, lm_steps=150, lm_budget_s=60.0, draft_steps=150, draft_budget_s=60.0, sequences=64)
CAPTURED = re.compile(r"Capture ([\w ]+?) CUDA graph end\.(?: bs=(\[[^\]]*\]))?")
MISSING_OP = re.compile(r"torch\.ops\.sgl_kernel\.(\w+) looked up but not defined")


def server_flags(target: Path, args) -> list[str]:
    """Flags of both servers (the EAGLE one adds its own). GPU: bf16, decode CUDA graphs up to the largest
    batch (setting them keeps the GPU stand-in mode from turning CUDA graphs off), no prefill graph."""
    flags = ["--model-path", str(target), "--disable-radix-cache", "--max-total-tokens", "32768"]
    if args.tiny:
        return flags + ["--dtype", "float32"]
    return flags + ["--dtype", "bfloat16", "--mem-fraction-static", str(args.mem_fraction),
                    "--cuda-graph-max-bs-decode", str(max(BATCHES)), "--disable-prefill-cuda-graph"]


def eagle_flags(draft: Path, steps: int) -> list[str]:
    return ["--eagle-draft", str(draft), "--eagle-steps", str(steps), "--eagle-draft-tokens", str(steps + 1)]


def captured_graphs(server_log: str) -> list[str]:
    """The CUDA graphs SGLang says it captured, e.g. ``target decode [1, 2, 4, 8, 12, 16]``."""
    return [f"{name} {bs}" if bs else name for name, bs in CAPTURED.findall(server_log)]


def identical(plain: list[list[int]], spec: list[list[int]]) -> tuple[int, int]:
    """(identical sequences, identical leading tokens summed over the sequences)."""
    same, lead = 0, 0
    for a, b in zip(plain, spec):
        same += a == b
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        lead += n
    return same, lead


def measure(name: str, server: LaunchedServer, prompts: list[list[int]], args, res: Results) -> dict[int, dict]:
    """Wait for ``server``, warm it up, then time each batch size; returns {batch: serve row + its outputs}."""
    t0 = time.perf_counter()
    server.wait_ready(timeout=args.startup_timeout)
    res.add(phase="ready", server=name, waited_s=round(time.perf_counter() - t0, 1), flags=server.args,
            cuda_graphs=captured_graphs(server.log()))
    t0 = time.perf_counter()
    run_batch(server.base_url, prompts[:1], 8)           # SGLang's JIT and Triton kernels compile on first use
    run_batch(server.base_url, prompts, 8)               # batched shapes
    res.add(phase="warmup", server=name, s=round(time.perf_counter() - t0, 1))
    out = {}
    for bs in BATCHES:
        walls, runs = [], []
        for _ in range(args.repeats):
            wall, responses = run_batch(server.base_url, prompts[:bs], args.max_new)
            walls.append(wall)
            runs.append(responses)
        ids = [r["output_ids"] for r in runs[-1]]
        tokens = sum(len(x) for x in ids)
        row = dict(phase="serve", server=name, batch=bs, new_tokens=args.max_new, tokens=tokens,
                   wall_s=[round(w, 4) for w in walls], tok_s=tokens / statistics.median(walls),
                   repeats_identical=all([r["output_ids"] for r in run] == ids for run in runs))
        if name == "eagle":
            row.update(served_acceptance([r["meta_info"] for r in runs[-1]]))
        res.add(**row)
        log(f"{name} batch {bs}: {row['tok_s']:.1f} tok/s")
        out[bs] = dict(row, output_ids=ids)
    # sgl_kernel ops the server looked up and no stand-in defines (GPU stand-in mode; hasattr probes included)
    res.add(phase="server_log", server=name, missing_standin_ops=sorted(set(MISSING_OP.findall(server.log()))))
    return out


def summarize(plain: dict, eagle: dict, offline: dict, res: Results) -> None:
    for bs in BATCHES:
        p, e = plain[bs], eagle[bs]
        same, lead = identical(p["output_ids"], e["output_ids"])
        res.add(phase="summary", batch=bs, new_tokens=p["new_tokens"], plain_tok_s=p["tok_s"],
                eagle_tok_s=e["tok_s"], speedup=e["tok_s"] / p["tok_s"],
                accept_length=1 + e["accepted_per_verify"], sglang_spec_accept_length=e["mean_accept_length"],
                accepted_drafts_histogram=e["accepted_drafts_histogram"], verifies=e["verifies"],
                offline_accept_length=offline[bs], identical_sequences=same, sequences=bs,
                identical_leading_tokens=lead, total_tokens=p["tokens"])
        log(f"batch {bs}: plain {p['tok_s']:.1f} tok/s, EAGLE-3 {e['tok_s']:.1f} tok/s "
            f"({e['tok_s'] / p['tok_s']:.2f}x), acceptance {1 + e['accepted_per_verify']:.2f} "
            f"(offline {offline[bs]:.2f}), identical {same}/{bs}")


def run(args) -> int:
    c = dict(TINY_TRAIN if args.tiny else GPU_TRAIN)
    c.update({k: v for k, v in (("lm_steps", args.lm_steps), ("draft_steps", args.draft_steps)) if v})
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU check")
    dev = torch.device("cpu" if args.tiny else "cuda")
    amp = None if args.tiny else torch.bfloat16                     # eagle_gpu's choice per device
    inf_dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs or out)
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    env = versions()
    env.update(command="python -m benchmarks.eagle_sglang_gpu " + " ".join(sys.argv[1:]), seed=args.seed,
               config={k: list(v) if isinstance(v, tuple) else v for k, v in c.items()},
               sglang=_version("sglang"), batches=list(BATCHES), eagle_steps=args.eagle_steps)
    if args.sha:
        env["git_sha"] = args.sha
    res = Results(out, env, name=NAME, bench=NAME)
    servers: list[LaunchedServer] = []

    def on_sigterm(*_):      # the hard timeout: stop the servers (their own process groups), keep the rows
        for srv in servers:
            srv.stop()
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="eagle_sglang_"))
    target_dir, draft_dir = model_dir / "target", model_dir / "draft"
    server_env = {} if args.tiny else {"TORCH_COMPILE_DISABLE": "1"}   # SGLang's torch.compile'd parts run eagerly
    try:
        tok = train_tokenizer(target_dir)
        env["tokenizer_sha1"] = hashlib.sha1((target_dir / "tokenizer.json").read_bytes()).hexdigest()
        target = train_target(c, target_dir, dev, args.seed, amp, res)
        target.requires_grad_(False)
        target_inf = copy.deepcopy(target).to(inf_dtype).eval()
        target.save_pretrained(target_dir, dtype=inf_dtype, bos_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)
        del target
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        flags = server_flags(target_dir, args)
        plain = LaunchedServer(flags, log_path=logs / "eagle_plain_server.log", env=server_env).start()
        servers.append(plain)
        log(f"plain server starting while the draft trains ({time.time() - t_start:.0f} s)")

        draft = train_eagle(c, target_inf, target_dir, dev, args.seed, amp, res)
        draft_inf = copy.deepcopy(draft).to(inf_dtype).eval()
        export_eagle3(draft, draft_dir, dtype=inf_dtype)
        prompts = eval_prompts(c, target_dir, args.seed, max(BATCHES), dev)
        offline = {}
        for bs in BATCHES:
            stats = simulate_chain(target_inf, draft_inf, prompts[:bs], args.max_new, args.eagle_steps)
            offline[bs] = stats.mean_length
            res.add(phase="offline_acceptance", batch=bs, draft_tokens=args.eagle_steps, new_tokens=args.max_new,
                    accept_length=stats.mean_length, histogram=stats.histogram(args.eagle_steps + 1),
                    verifies=stats.verifies, dtype=str(inf_dtype))
        prompts = prompts.tolist()
        del draft, draft_inf, target_inf
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        log(f"models ready in {model_dir} ({time.time() - t_start:.0f} s)")

        plain_out = measure("plain", plain, prompts, args, res)
        plain.stop()
        spec = LaunchedServer(flags + eagle_flags(draft_dir, args.eagle_steps),
                              log_path=logs / "eagle_spec_server.log", env=server_env).start()
        servers.append(spec)
        eagle_out = measure("eagle", spec, prompts, args, res)
        spec.stop()
        summarize(plain_out, eagle_out, offline, res)
    except Exception as exc:  # noqa: BLE001 (recorded: the rows measured so far stay in the file)
        res.add(phase="error", error=f"{type(exc).__name__}: {str(exc)[-2500:]}")
        log(f"error: {exc}")
        return 1
    finally:
        for srv in servers:
            srv.stop()
    res.add(phase="done", total_s=round(time.time() - t_start, 1))
    log(f"done in {time.time() - t_start:.0f} s -> {res.path}")
    return 0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eagle_sglang_gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help=f"directory for {NAME}.jsonl")
    ap.add_argument("--logs", help="directory for the servers' logs (default: --out)")
    ap.add_argument("--tiny", action="store_true", help="demo-sized models on the CPU: a check of the whole path")
    ap.add_argument("--model-dir", help="where the target and draft are written (default: a new temporary folder)")
    ap.add_argument("--max-new", type=int, default=None, help="new tokens per request (128; tiny 16)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per batch, the median is kept (3; tiny 1)")
    ap.add_argument("--eagle-steps", type=int, default=3, help="draft tokens per verify (--eagle-steps)")
    ap.add_argument("--lm-steps", type=int, help=f"target training steps (eagle_gpu's {FULL['lm_steps']})")
    ap.add_argument("--draft-steps", type=int, help=f"draft training steps (eagle_gpu's {FULL['draft_steps']})")
    ap.add_argument("--mem-fraction", type=float, default=0.5, help="GPU: SGLang's --mem-fraction-static")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds a server may take to be ready")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sha", help="git SHA to record (a copy of the tree without .git cannot tell its own)")
    args = ap.parse_args(argv)
    if args.max_new is None:
        args.max_new = 16 if args.tiny else 128
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 3
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
