"""S2O's time to first token through SGLang on a GPU, against stock SGLang on the same model and GPU.

A random-weight Llama with Llama-3.1-8B's attention shape (hidden 4096, 32 query heads, 8 KV heads, head dim
128, rope theta 500000, MLP 14336; ``--layers`` of them, few to keep loading short) and a byte-level BPE
tokenizer are built locally (nothing downloaded). Each configuration is served by ``python -m sgl_slim.launch``
(the stock server is the same launcher without ``--s2o``: with no feature on, sgl_slim leaves SGLang stock),
one at a time, and gets:

- a greedy check: 16 tokens after a short prompt (below ``--s2o-min-length``: S2O's dense route, i.e. the
  stock backend) and after a prompt of the first length (S2O's sparse route), compared with the stock
  server's token for token;
- per prompt length: one warm-up request (SGLang's JIT and Triton kernels compile on first use), then
  ``--reps`` timed requests, each a fresh random prompt (radix cache off too), ``max_new_tokens=1``: the
  request's wall time is its time to first token (prefill of the whole prompt in one chunk, plus one token).

One JSON line per measurement goes to ``--out`` as it is made (a run cut short keeps what it measured).
Usage (on the GPU host, after scripts/gpu_install.sh; scripts/gpu_serve_bench.sh does both):

    python -m benchmarks.serving_gpu --out results.jsonl --logs DIR [--layers 4] [--lengths 32768,65536,131072]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from benchmarks.harness import env_info
from sgl_slim.bench.runner import LaunchedServer

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, ROPE_THETA = 4096, 32, 8, 128, 14336, 500000.0
SHORT_PROMPT_TOKENS, SHORT_NEW_TOKENS = 200, 16
FIRST_ID = 32   # random prompt ids start above the tokenizer's special tokens


def build_model(out_dir: Path, *, layers: int, max_len: int, qk_std: float, seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM (bf16 safetensors) plus a locally trained tokenizer, in ``out_dir``."""
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    from sgl_slim.demo import train_tokenizer  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out_dir)
    tok.model_max_length = max_len
    tok.save_pretrained(out_dir)
    vocab = len(tok)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "rope_theta": ROPE_THETA,
        "max_position_embeddings": max_len, "rms_norm_eps": 1e-5, "hidden_act": "silu", "vocab_size": vocab,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id, "attention_bias": False, "mlp_bias": False,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(torch.bfloat16)

    kv = KV_HEADS * HEAD_DIM
    weights = {"model.embed_tokens.weight": rand(vocab, HIDDEN, std=1.0), "lm_head.weight": rand(vocab, HIDDEN),
               "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16, device=device)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN, std=qk_std),
            p + "self_attn.k_proj.weight": rand(kv, HIDDEN, std=qk_std),
            p + "self_attn.v_proj.weight": rand(kv, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": rand(MLP, HIDDEN), p + "mlp.up_proj.weight": rand(MLP, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, MLP),
            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16, device=device),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16, device=device),
        })
    save_file({k: v.cpu().contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"))
    return out_dir


def generate(base_url: str, ids: list[int], max_new_tokens: int) -> tuple[float, dict]:
    import requests  # noqa: PLC0415

    t0 = time.perf_counter()
    r = requests.post(base_url + "/generate", timeout=600, json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                              "ignore_eos": True}})
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed, r.json()


def prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]


def serve_and_measure(name: str, model: Path, flags: list[str], args, vocab: int, emit, reference: list | None):
    common = ["--model-path", str(model), "--dtype", "bfloat16", "--attention-backend", "triton",
              "--disable-radix-cache", "--chunked-prefill-size", "-1", "--max-prefill-tokens", str(args.max_len),
              "--mem-fraction-static", "0.6", "--max-total-tokens", str(3 * args.max_len),
              "--max-running-requests", "4"]
    log = Path(args.logs) / f"server_{name}.log"
    t0 = time.perf_counter()
    server = LaunchedServer(common + flags, log_path=log).start()
    try:
        server.wait_ready(timeout=args.startup_timeout)
        ready_s = time.perf_counter() - t0
        emit({"config": name, "kind": "ready", "flags": flags, "ready_s": round(ready_s, 1)})
        rng = random.Random(1234)
        short = prompt(rng, SHORT_PROMPT_TOKENS, vocab)
        _, out = generate(server.base_url, short, SHORT_NEW_TOKENS)
        tokens = out.get("output_ids")
        long_ids = prompt(random.Random(99), args.lengths[0], vocab)
        _, out = generate(server.base_url, long_ids, SHORT_NEW_TOKENS)
        tokens = (tokens, out.get("output_ids"))
        row = {"config": name, "kind": "greedy", "prompt_tokens": [len(short), len(long_ids)],
               "output_ids": list(tokens)}
        if reference is not None:
            row["equal_to_stock"] = [a == b for a, b in zip(tokens, reference)]
        emit(row)
        for length in args.lengths:
            if time.perf_counter() - args.t_start > args.budget_s:
                emit({"config": name, "kind": "skipped", "length": length, "why": "time budget"})
                break
            rng = random.Random(length)
            warm_s, _ = generate(server.base_url, prompt(rng, length, vocab), 1)
            times, metas = [], []
            for _ in range(args.reps):
                t, out = generate(server.base_url, prompt(rng, length, vocab), 1)
                times.append(t)
                metas.append({k: v for k, v in out.get("meta_info", {}).items()
                              if k in ("prompt_tokens", "e2e_latency") or "s2o" in k or "sgl_slim" in k})
            emit({"config": name, "kind": "ttft", "length": length, "warmup_s": round(warm_s, 4),
                  "ttft_s": [round(t, 4) for t in times], "ttft_median_s": round(statistics.median(times), 4),
                  "meta": metas})
        return tokens
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON lines file (appended)")
    ap.add_argument("--logs", required=True, help="folder for the servers' logs")
    ap.add_argument("--model-dir", default="/tmp/sgl_slim_llama_shape")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--qk-std", type=float, default=0.02, help="std of the random q/k projections")
    ap.add_argument("--configs", default="stock,s2o",
                    help="stock, s2o, s2o-tau=X, each optionally +fp8kv (an fp8_e4m3 KV cache); comma-separated")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip lengths once this much time has passed")
    ap.add_argument("--startup-timeout", type=float, default=240.0)
    args = ap.parse_args(argv)
    args.t_start = time.perf_counter()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.max_len = max(args.lengths) + 1024
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    def emit(row: dict) -> None:
        row = {"t_s": round(time.perf_counter() - args.t_start, 1), **row}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    t0 = time.perf_counter()
    model = build_model(Path(args.model_dir), layers=args.layers, max_len=args.max_len, qk_std=args.qk_std)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    emit({"kind": "setup", "env": env_info(), "model": {
        "layers": args.layers, "hidden": HIDDEN, "q_heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "mlp": MLP, "rope_theta": ROPE_THETA, "vocab": vocab, "max_position_embeddings": args.max_len,
        "qk_std": args.qk_std, "weights": "random (seed 0)"}, "build_s": round(time.perf_counter() - t0, 1),
        "reps": args.reps, "chunked_prefill": "off (whole prompt in one extend)"})
    reference = None
    for cfg in args.configs.split(","):
        if time.perf_counter() - args.t_start > args.budget_s:
            emit({"config": cfg, "kind": "skipped", "why": "time budget"})
            continue
        base, _, option = cfg.partition("+")
        flags = [] if base == "stock" else ["--s2o"]
        if base.startswith("s2o-tau="):
            flags += ["--s2o-tau", base.split("=", 1)[1]]
        if option == "fp8kv":
            flags += ["--kv-cache-dtype", "fp8_e4m3"]
        try:
            tokens = serve_and_measure(cfg, model, flags, args, vocab, emit, reference)
            if cfg == "stock":
                reference = tokens
        except Exception as exc:  # noqa: BLE001 (recorded, and the next configuration still runs)
            emit({"config": cfg, "kind": "error", "error": f"{type(exc).__name__}: {str(exc)[-2500:]}"})


if __name__ == "__main__":
    main()
