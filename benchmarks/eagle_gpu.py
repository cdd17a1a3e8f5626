"""EAGLE-3 on one GPU, torch only (no SGLang): train a larger text target and its EAGLE-3 draft, measure the
draft's acceptance, the draft step's cost relative to a target step, and a real speculative decoding loop.

    python -m benchmarks.eagle_gpu --out DIR            # the H200 run (~7-8 min wall, one call)
    python -m benchmarks.eagle_gpu --tiny --out DIR     # seconds, on the CPU: checks the whole path
    python -m benchmarks.eagle_gpu --report benchmarks/results/eagle_gpu.jsonl   # tables + plot, here

Phases (each appends rows to DIR/eagle_gpu.jsonl as soon as it ends, so a timeout still returns data):
 1. target: ``TextLM`` (hidden 768, 12 layers, GQA 12/4, vocab 2048 from the demo BPE tokenizer, trained here
    from the running Python's standard library), trained from a seeded init on stdlib source ("train" split),
    bf16 autocast, a fixed step count (cut to fit the phase's time budget after a 10-step timing probe, before
    the seeded run starts; the row says so). Held-out loss on the "eval" split.
 2. draft: ``sgl_slim.spec.train`` (target's own greedy continuations of "draft"-split prompts, TTT k=4, 0.8^i).
 3. acceptance: ``simulate_chain`` on held-out prompts for 1..5 draft tokens per verify.
 4. step cost: one target decode step vs one draft chain step (and the target's verify of k+1 tokens, the
    draft's extend) at batch 1/4/16 with KV caches, bf16, eager and CUDA-graph replay; predicted speedup
    L / (1 + k c) (a model, not a measurement).
 5. end to end, batch 1: ``speculative_greedy`` vs ``TextLM.generate_greedy`` (both eager bf16), outputs compared;
    exactness also checked in fp32.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import env_info, markdown_table, read_results, record, time_ms, write_results
from sgl_slim.spec.data import load_tokenizer, stdlib_files, token_stream
from sgl_slim.spec.decode import speculative_greedy
from sgl_slim.spec.draft import DraftConfig, Eagle3Draft, fuse_aux
from sgl_slim.spec.metrics import simulate_chain
from sgl_slim.spec.target_lm import lm_loss, lm_train_step, make_lm_optimizer
from sgl_slim.spec.textlm import TextConfig, TextLM
from sgl_slim.spec.train import build_dataset, choose_draft_vocab, draft_train_step, make_draft_optimizer

NAME = "eagle_gpu"

FULL = dict(
    hidden=768, layers=12, heads=12, kv_heads=4, inter=2048,
    lm_seq=512, lm_batch=32, lm_lr=8e-4, lm_steps=1000, lm_budget_s=150.0, lm_eval_windows=64,
    sequences=8192, prompt_len=48, gen_len=80, gen_batch=512,
    draft_batch=64, draft_lr=2e-3, draft_steps=3000, draft_budget_s=80.0, ttt=4,
    eval_prompts=32, eval_tokens=64, max_k=5,
    ctx=512, batches=(1, 4, 16), verify_ks=(3, 4), timing_iters=50,
    e2e_prompts=8, e2e_tokens=128, e2e_ks=(2, 3, 4), exact_prompts=4, exact_tokens=64,
)
TINY = dict(
    hidden=64, layers=4, heads=4, kv_heads=2, inter=128,
    lm_seq=64, lm_batch=4, lm_lr=3e-3, lm_steps=12, lm_budget_s=30.0, lm_eval_windows=4,
    sequences=16, prompt_len=16, gen_len=16, gen_batch=8,
    draft_batch=4, draft_lr=2e-3, draft_steps=12, draft_budget_s=30.0, ttt=4,
    eval_prompts=2, eval_tokens=16, max_k=5,
    ctx=32, batches=(1, 4), verify_ks=(3,), timing_iters=3,
    e2e_prompts=1, e2e_tokens=16, e2e_ks=(3,), exact_prompts=1, exact_tokens=16,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def versions() -> dict:
    info = env_info()
    info["python_full"] = sys.version.split()[0]
    info["platform"] = platform.platform()
    for mod in ("transformers", "tokenizers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu_mem_gib"] = round(p.total_memory / 2**30, 1)
        info["sm_count"] = p.multi_processor_count
    return info


def init_like_hf(model: torch.nn.Module, std: float = 0.02) -> None:
    """Normal(0, 0.02) weights, zero biases, ones for norms (what a fresh HF checkpoint has)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)


def make_target(c: dict, vocab: int, seed: int, dev: torch.device) -> TextLM:
    cfg = TextConfig(vocab_size=vocab, hidden_size=c["hidden"], intermediate_size=c["inter"], num_layers=c["layers"],
                     num_heads=c["heads"], num_kv_heads=c["kv_heads"], head_dim=c["hidden"] // c["heads"],
                     rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = TextLM(cfg, qkv_bias=True)
    init_like_hf(model)
    return model.to(dev).train()


def windows_at(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """stream[starts[i] : starts[i] + length] for each i -> [len(starts), length] (a gather, on stream's device)."""
    return stream[starts[:, None].to(stream.device) + torch.arange(length, device=stream.device)]


class Results:
    """Rows of one run in ``out/{name}.jsonl``, the environment first; the file is rewritten after each row."""

    def __init__(self, out: Path, env: dict, name: str = NAME, bench: str = NAME):
        self.path = out / f"{name}.jsonl"
        self.env = env
        self.bench = bench
        self.rows: list[dict] = []

    def add(self, **fields) -> dict:
        row = record(self.bench, **fields)
        self.rows.append(row)
        write_results(self.path, self.rows, env=self.env)
        return row


# ---- phase 1: target ------------------------------------------------------------------------------------
def train_target(c, tokdir, dev, seed, amp, res: Results) -> TextLM:
    t0 = time.time()
    stream = token_stream(tokdir, "train", max_tokens=8_000_000)
    eval_stream = token_stream(tokdir, "eval", max_tokens=1_000_000)
    log(f"tokenized: train {stream.numel()} tokens, eval {eval_stream.numel()} tokens ({time.time() - t0:.1f} s)")
    vocab = load_tokenizer(tokdir).get_vocab_size(with_added_tokens=True)
    if int(stream.max()) >= vocab:
        raise ValueError(f"token id {int(stream.max())} outside the tokenizer's vocabulary of {vocab}")
    stream_d = stream.to(dev)
    seq, batch = c["lm_seq"], c["lm_batch"]
    gen = torch.Generator().manual_seed(seed)
    starts_all = torch.randint(0, stream.numel() - seq - 1, (c["lm_steps"] * batch,), generator=gen)

    # timing probe (its model is thrown away): fixes the step count before the seeded run
    model = make_target(c, vocab, seed, dev)
    params, opt, sched = make_lm_optimizer(model, c["lm_steps"], c["lm_lr"])
    probe = []
    for i in range(10):
        sync(dev)
        ts = time.perf_counter()
        lm_train_step(model, params, opt, sched, windows_at(stream_d, starts_all[i * batch:(i + 1) * batch], seq + 1),
                      amp_dtype=amp)
        sync(dev)
        probe.append(time.perf_counter() - ts)
    step_s = sorted(probe[3:])[len(probe[3:]) // 2]
    steps = max(10, min(c["lm_steps"], int(c["lm_budget_s"] / step_s)))
    log(f"target probe: {step_s * 1e3:.1f} ms/step -> {steps} steps (asked {c['lm_steps']})")
    del model, params, opt, sched

    model = make_target(c, vocab, seed, dev)
    n_params = sum(p.numel() for p in model.parameters())
    params, opt, sched = make_lm_optimizer(model, steps, c["lm_lr"])
    losses = []
    sync(dev)
    t1 = time.perf_counter()
    for step in range(steps):
        loss = lm_train_step(model, params, opt, sched,
                             windows_at(stream_d, starts_all[step * batch:(step + 1) * batch], seq + 1), amp_dtype=amp)
        losses.append(loss)
        if (step + 1) % 250 == 0:
            log(f"target step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t1:.0f} s)")
    sync(dev)
    train_s = time.perf_counter() - t1
    curve = torch.stack(losses).float().cpu().tolist()
    model.eval()
    egen = torch.Generator().manual_seed(seed + 7)
    estarts = torch.randint(0, eval_stream.numel() - seq - 1, (c["lm_eval_windows"],), generator=egen)
    ewin = windows_at(eval_stream.to(dev), estarts, seq + 1)
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        eval_loss = sum(lm_loss(model, ewin[i:i + 8]).item() * ewin[i:i + 8].shape[0]
                        for i in range(0, ewin.shape[0], 8)) / ewin.shape[0]
    tokens = steps * batch * seq
    res.add(phase="target_train", params_m=round(n_params / 1e6, 2), hidden=c["hidden"], layers=c["layers"],
            heads=c["heads"], kv_heads=c["kv_heads"], inter=c["inter"], vocab=vocab, seq=seq, batch=batch,
            lr=c["lm_lr"], steps=steps, steps_asked=c["lm_steps"], probe_ms_per_step=round(step_s * 1e3, 2),
            train_s=round(train_s, 1), tokens=tokens, tokens_per_s=round(tokens / train_s),
            steps_per_s=round(steps / train_s, 2),
            model_tflops_per_s=round(6 * n_params * tokens / train_s / 1e12, 1),
            loss_first=curve[0], loss_last10=sum(curve[-10:]) / len(curve[-10:]),
            eval_loss=eval_loss, eval_windows=c["lm_eval_windows"],
            loss_curve=[round(x, 4) for x in curve[:: max(1, steps // 100)]],
            loss_curve_every=max(1, steps // 100), train_tokens_available=stream.numel(),
            epochs=round(tokens / stream.numel(), 2), amp=str(amp))
    log(f"target: {steps} steps in {train_s:.1f} s, {tokens / train_s:,.0f} tok/s, loss {curve[0]:.3f} -> "
        f"{curve[-1]:.3f}, held-out {eval_loss:.3f}")
    return model


# ---- phase 2: draft ------------------------------------------------------------------------------------
def train_eagle(c, target_inf: TextLM, tokdir, dev, seed, amp, res: Results) -> Eagle3Draft:
    cfg = DraftConfig.for_target(target_inf.cfg, 2048)
    sync(dev)
    t0 = time.perf_counter()
    data = build_dataset(target_inf, tokdir, sequences=c["sequences"], prompt_len=c["prompt_len"], gen_len=c["gen_len"],
                         aux_layer_ids=cfg.aux_layer_ids, seed=seed, batch=c["gen_batch"])
    sync(dev)
    data_s = time.perf_counter() - t0
    log(f"draft data: {c['sequences']} continuations of {c['prompt_len']}+{c['gen_len']} in {data_s:.1f} s")

    def fresh():
        torch.manual_seed(seed)
        d = Eagle3Draft(cfg).to(dev)
        d.embed_tokens.weight.data.copy_(target_inf.embed_tokens.weight.float())
        d.set_vocab(choose_draft_vocab(data["labels"], cfg.draft_vocab_size, cfg.vocab_size))
        return d

    n, b = data["tokens"].shape[0], c["draft_batch"]
    gen = torch.Generator().manual_seed(seed)
    idx_all = torch.randint(0, n, (c["draft_steps"], b), generator=gen)
    draft = fresh()
    labels = draft.draft_ids(data["labels"])
    params, opt, sched = make_draft_optimizer(draft, c["draft_steps"], c["draft_lr"])
    probe = []
    for i in range(10):
        sync(dev)
        ts = time.perf_counter()
        idx = idx_all[i]
        draft_train_step(draft, params, opt, sched, data["aux"][idx], data["tokens"][idx], labels[idx], c["ttt"],
                         amp_dtype=amp, with_acc=False)
        sync(dev)
        probe.append(time.perf_counter() - ts)
    step_s = sorted(probe[3:])[len(probe[3:]) // 2]
    steps = max(10, min(c["draft_steps"], int(c["draft_budget_s"] / step_s)))
    log(f"draft probe: {step_s * 1e3:.1f} ms/step -> {steps} steps (asked {c['draft_steps']})")

    draft = fresh()
    params, opt, sched = make_draft_optimizer(draft, steps, c["draft_lr"])
    n_params = sum(p.numel() for p in params)
    losses, accs_last = [], None
    sync(dev)
    t1 = time.perf_counter()
    for step in range(steps):
        idx = idx_all[step]
        last = step + 1 == steps
        loss, accs = draft_train_step(draft, params, opt, sched, data["aux"][idx], data["tokens"][idx], labels[idx],
                                      c["ttt"], amp_dtype=amp, with_acc=last)
        losses.append(loss)
        if last:
            accs_last = accs
        if (step + 1) % 500 == 0:
            log(f"draft step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t1:.0f} s)")
    sync(dev)
    train_s = time.perf_counter() - t1
    curve = torch.stack(losses).float().cpu().tolist()
    tok_per_step = b * (data["tokens"].shape[1] - 1)
    res.add(phase="draft_train", params_m_trainable=round(n_params / 1e6, 2), aux_layer_ids=list(cfg.aux_layer_ids),
            draft_vocab=cfg.draft_vocab_size, ttt_steps=c["ttt"], batch=b, seq=int(data["tokens"].shape[1]),
            sequences=c["sequences"], data_s=round(data_s, 1), lr=c["draft_lr"], steps=steps,
            steps_asked=c["draft_steps"], probe_ms_per_step=round(step_s * 1e3, 2), train_s=round(train_s, 1),
            tokens_per_s=round(steps * tok_per_step / train_s), steps_per_s=round(steps / train_s, 2),
            loss_first=curve[0], loss_last10=sum(curve[-10:]) / len(curve[-10:]),
            train_acc_last_step=[round(a, 4) for a in accs_last or []],
            loss_curve=[round(x, 4) for x in curve[:: max(1, steps // 100)]], loss_curve_every=max(1, steps // 100),
            amp=str(amp))
    log(f"draft: {steps} steps in {train_s:.1f} s, loss {curve[0]:.3f} -> {curve[-1]:.3f}, acc {accs_last}")
    del data
    return draft


# ---- phase 3: acceptance --------------------------------------------------------------------------------
def eval_prompts(c, tokdir, seed, count, dev):
    from sgl_slim.spec.data import sample_windows  # noqa: PLC0415
    stream = token_stream(tokdir, "eval", max_tokens=100_000)
    return sample_windows(stream, count, c["prompt_len"], seed + 1).to(dev)


def acceptance(c, target_inf, draft_inf, prompts, dev, res: Results) -> dict[int, float]:
    lengths = {}
    for k in range(1, c["max_k"] + 1):
        sync(dev)
        t0 = time.perf_counter()
        stats = simulate_chain(target_inf, draft_inf, prompts, c["eval_tokens"], k)
        sync(dev)
        lengths[k] = stats.mean_length
        res.add(phase="acceptance", draft_tokens=k, prompts=prompts.shape[0], new_tokens=c["eval_tokens"],
                mean_accept_length=stats.mean_length, mean_accepted=stats.mean_accepted,
                histogram=stats.histogram(k + 1), verifies=stats.verifies, sim_s=round(time.perf_counter() - t0, 1))
        log(f"acceptance k={k}: {stats.mean_length:.3f} {stats.histogram(k + 1)}")
    return lengths


# ---- phase 4: step cost ---------------------------------------------------------------------------------
def graph_ms(fn, iters: int) -> float:
    """Median ms of replaying ``fn`` captured in a CUDA graph (static inputs: the same step every replay)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_ms(g.replay, warmup=5, iters=iters)


def step_cost(c, target_inf, draft_inf, dev, lengths, res: Results) -> None:
    ctx, iters = c["ctx"], c["timing_iters"]
    vocab = target_inf.cfg.vocab_size
    layers = draft_inf.cfg.aux_layer_ids
    gen = torch.Generator().manual_seed(123)
    for b in c["batches"]:
        toks = torch.randint(0, vocab, (b, ctx + 8), generator=gen).to(dev)
        with torch.no_grad():
            _, hiddens, past = target_inf(toks[:, :ctx])
            (k0, v0), g, lg = draft_inf.extend(fuse_aux(hiddens, layers)[:, :ctx], toks[:, 1:ctx + 1], 0, None)
        tok1 = toks[:, ctx]
        hid1 = g[:, -1:].contiguous()
        qcol = torch.full((1,), ctx - 1, device=dev)
        pos = torch.full((b, 1), ctx, device=dev)
        aux_new = fuse_aux(hiddens, layers)[:, -5:].contiguous()

        def target_decode():
            with torch.no_grad():
                h, _, _ = target_inf(tok1[:, None], past, start=ctx)
                return target_inf.logits(h[:, -1]).argmax(-1)

        def make_verify(n):
            feed = toks[:, ctx: ctx + n]

            def verify():
                with torch.no_grad():
                    h, _, _ = target_inf(feed, past, start=ctx)
                    return target_inf.logits(h).argmax(-1)
            return verify

        def draft_step():
            with torch.no_grad():
                return draft_inf.chain_step(tok1, hid1, k0, v0, [], [], qcol, pos)

        def make_extend(n):
            a, nt = aux_new[:, :n], toks[:, ctx: ctx + n]

            def extend():
                with torch.no_grad():
                    return draft_inf.extend(a, nt, ctx, (k0, v0))
            return extend

        fns = {"target_decode": target_decode, "draft_step": draft_step, "draft_extend_1": make_extend(1)}
        for k in c["verify_ks"]:
            fns[f"target_verify_{k + 1}"] = make_verify(k + 1)
            fns[f"draft_extend_{k + 1}"] = make_extend(k + 1)
        row = {"phase": "step_cost", "batch": b, "context": ctx}
        for name, fn in fns.items():
            row[f"{name}_ms_eager"] = time_ms(fn, warmup=5, iters=iters)
            if dev.type == "cuda":
                try:
                    row[f"{name}_ms_graph"] = graph_ms(fn, iters)
                except Exception as e:  # noqa: BLE001 (record why, keep the eager numbers)
                    row[f"{name}_graph_error"] = f"{type(e).__name__}: {e}"[:300]
        for mode in ("eager", "graph"):
            t, d = row.get(f"target_decode_ms_{mode}"), row.get(f"draft_step_ms_{mode}")
            if t and d:
                ratio = d / t
                row[f"c_{mode}"] = ratio
                row[f"predicted_speedup_{mode}"] = {str(k): lengths[k] / (1 + k * ratio) for k in sorted(lengths)}
        res.add(**row)
        log(f"step cost b={b}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)))


# ---- phase 5: end to end --------------------------------------------------------------------------------
def end_to_end(c, target_inf, draft_inf, target32, draft32, prompts, dev, res: Results) -> None:
    n_new = c["e2e_tokens"]

    def timed(fn):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        return out, time.perf_counter() - t0

    speculative_greedy(target_inf, draft_inf, prompts[:1], 8, 3)   # warm-up
    target_inf.generate_greedy(prompts[:1], 8)
    plain, plain_s = [], 0.0
    for i in range(prompts.shape[0]):
        out, s = timed(lambda: target_inf.generate_greedy(prompts[i: i + 1], n_new))
        plain.append(out)
        plain_s += s
    for k in c["e2e_ks"]:
        spec_s, same, same_tokens, lengths = 0.0, 0, 0, []
        for i in range(prompts.shape[0]):
            (out, stats), s = timed(lambda: speculative_greedy(target_inf, draft_inf, prompts[i: i + 1], n_new, k))
            spec_s += s
            same += int(torch.equal(out, plain[i]))
            same_tokens += int((out == plain[i]).cumprod(-1).sum())
            lengths += stats.lengths
        total = prompts.shape[0] * n_new
        res.add(phase="e2e", draft_tokens=k, batch=1, prompts=prompts.shape[0], new_tokens=n_new, dtype="bf16",
                mode="eager", plain_tok_s=total / plain_s, spec_tok_s=total / spec_s, speedup=plain_s / spec_s,
                identical_sequences=same, identical_prefix_tokens=same_tokens, total_tokens=total,
                mean_accept_length=sum(lengths) / len(lengths))
        log(f"e2e k={k}: plain {total / plain_s:.1f} tok/s, spec {total / spec_s:.1f} tok/s, "
            f"speedup {plain_s / spec_s:.2f}x, identical {same}/{prompts.shape[0]}")
    # exactness in fp32 (TF32 off): the loop must reproduce plain greedy decoding token for token
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        k = c["e2e_ks"][len(c["e2e_ks"]) // 2]
        same, count = 0, min(c["exact_prompts"], prompts.shape[0])
        for i in range(count):
            ref = target32.generate_greedy(prompts[i: i + 1], c["exact_tokens"])
            out, _ = speculative_greedy(target32, draft32, prompts[i: i + 1], c["exact_tokens"], k)
            same += int(torch.equal(out, ref))
        res.add(phase="e2e_exact_fp32", draft_tokens=k, prompts=count, new_tokens=c["exact_tokens"],
                identical_sequences=same)
        log(f"fp32 exactness: {same}/{count} identical")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# ---- where the eager loop's time goes (random weights: per-verify cost does not depend on them) -------------
def loop_profile(c, dev, seed, res: Results) -> None:
    amp_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    vocab = 2048
    target = make_target(c, vocab, seed, dev).to(amp_dtype).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    draft = Eagle3Draft(DraftConfig.for_target(target.cfg, vocab)).to(dev)
    draft.set_vocab(torch.arange(vocab, device=dev))
    draft = draft.to(amp_dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (4, c["prompt_len"]), generator=gen).to(dev)
    n_new, k = c["e2e_tokens"], 4

    def wall(fn):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        return time.perf_counter() - t0

    def synced_greedy(prompt):
        with torch.no_grad():
            hidden, _, past = target(prompt)
            tok = target.logits(hidden[:, -1]).argmax(-1)
            for i in range(n_new - 1):
                tok.item()                                  # a host sync per token, like the verify loop's
                hidden, _, past = target(tok[:, None], past, start=prompt.shape[1] + i)
                tok = target.logits(hidden[:, -1]).argmax(-1)

    speculative_greedy(target, draft, prompts[:1], 8, k)
    target.generate_greedy(prompts[:1], 8)
    synced_greedy(prompts[:1])
    row = {"phase": "loop_profile", "draft_tokens": k, "prompts": prompts.shape[0], "new_tokens": n_new,
           "weights": "random (acceptance ~1)"}
    plain = sum(wall(lambda: target.generate_greedy(prompts[i: i + 1], n_new)) for i in range(prompts.shape[0]))
    synced = sum(wall(lambda: synced_greedy(prompts[i: i + 1])) for i in range(prompts.shape[0]))
    row["plain_ms_per_token"] = plain * 1e3 / (prompts.shape[0] * n_new)
    row["plain_synced_ms_per_token"] = synced * 1e3 / (prompts.shape[0] * n_new)
    verifies, spec = 0, 0.0
    for i in range(prompts.shape[0]):
        box = {}
        spec += wall(lambda: box.update(r=speculative_greedy(target, draft, prompts[i: i + 1], n_new, k)))
        verifies += box["r"][1].verifies
    row["spec_ms_per_verify"] = spec * 1e3 / verifies
    prof: dict = {}
    for i in range(prompts.shape[0]):
        speculative_greedy(target, draft, prompts[i: i + 1], n_new, k, profile=prof)
    for name in ("draft", "verify", "accept", "extend"):
        row[f"profiled_{name}_ms_per_verify"] = prof[name] * 1e3 / prof["verifies"]
    res.add(**row)
    log("loop profile: " + ", ".join(f"{a}={b:.3f}" for a, b in row.items() if isinstance(b, float)))
    step_cost(dict(c, batches=(1,), ctx=c["prompt_len"] + n_new // 2, verify_ks=(k,)), target, draft, dev,
              {k: 1.0}, res)


# ---- driver ----------------------------------------------------------------------------------------------
def run(args) -> Path:
    c = TINY if args.tiny else FULL
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    bf16 = dev.type == "cuda" or args.bf16
    amp = torch.bfloat16 if bf16 else None
    inf_dtype = torch.bfloat16 if bf16 else torch.float32
    if dev.type == "cpu":
        torch.set_num_threads(1)        # tiny CPU check on a shared, loaded machine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    env = versions()
    env["device"] = str(dev)
    env["command"] = "python -m benchmarks.eagle_gpu " + " ".join(sys.argv[1:])
    env["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}
    env["seed"] = args.seed
    if args.sha:
        env["git_sha"] = args.sha
    log(f"env: {json.dumps({k: env[k] for k in ('python', 'torch', 'triton', 'transformers', 'gpu', 'git_sha')})}")

    from sgl_slim.demo import train_tokenizer  # noqa: PLC0415 (transformers + tokenizers; no sglang)
    tokdir = Path(tempfile.mkdtemp(prefix="eagle_gpu_tok_"))
    t0 = time.time()
    train_tokenizer(tokdir)
    env["tokenizer_sha1"] = hashlib.sha1((tokdir / "tokenizer.json").read_bytes()).hexdigest()
    env["tokenizer_s"] = round(time.time() - t0, 1)
    env["stdlib_files"] = {s: len(stdlib_files(s)) for s in ("train", "draft", "eval")}
    log(f"tokenizer {env['tokenizer_sha1'][:12]} in {env['tokenizer_s']} s; stdlib files {env['stdlib_files']}")
    res = Results(out, env)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    target = train_target(c, tokdir, dev, args.seed, amp, res)
    for p in target.parameters():
        p.requires_grad_(False)
    target_inf = copy.deepcopy(target).to(inf_dtype).eval()
    draft = train_eagle(c, target_inf, tokdir, dev, args.seed, amp, res)
    draft_inf = copy.deepcopy(draft).to(inf_dtype).eval()
    log(f"elapsed {time.time() - t_start:.0f} s")

    prompts = eval_prompts(c, tokdir, args.seed, c["eval_prompts"], dev)
    lengths = acceptance(c, target_inf, draft_inf, prompts, dev, res)
    log(f"elapsed {time.time() - t_start:.0f} s")
    step_cost(c, target_inf, draft_inf, dev, lengths, res)
    log(f"elapsed {time.time() - t_start:.0f} s")
    if time.time() - t_start < args.e2e_deadline_s:
        try:
            end_to_end(c, target_inf, draft_inf, target.eval(), draft.eval(), prompts[: c["e2e_prompts"]], dev, res)
        except Exception as e:  # noqa: BLE001 (the earlier phases' rows are kept; say what broke)
            res.add(phase="e2e_error", error=f"{type(e).__name__}: {e}"[:500])
            log(f"e2e failed: {e}")
    else:
        res.add(phase="e2e_skipped", reason=f"elapsed {time.time() - t_start:.0f} s > {args.e2e_deadline_s} s")
    res.add(phase="done", total_s=round(time.time() - t_start, 1))
    log(f"done in {time.time() - t_start:.0f} s -> {res.path}")
    return res.path


# ---- report (here, from the JSONL) -----------------------------------------------------------------------
def report(path: Path, png: Path | None) -> str:
    env, rows = read_results(path)
    by = {}
    for r in rows:
        by.setdefault(r["phase"], []).append(r)
    md = []
    if "target_train" in by:
        t = by["target_train"][0]
        md.append(markdown_table([dict(t, loss=f"{t['loss_first']:.2f} -> {t['loss_last10']:.2f}",
                                       model=f"{t['params_m']}M ({t['layers']}L, h{t['hidden']}, "
                                             f"GQA {t['heads']}/{t['kv_heads']}, vocab {t['vocab']})")],
                                 ["model", "steps", "batch", "seq", "train_s", "tokens_per_s", "steps_per_s",
                                  "model_tflops_per_s", "loss", "eval_loss", "epochs"]))
    if "draft_train" in by:
        d = by["draft_train"][0]
        md.append(markdown_table([dict(d, loss=f"{d['loss_first']:.2f} -> {d['loss_last10']:.2f}",
                                       layers=str(d["aux_layer_ids"]))],
                                 ["params_m_trainable", "layers", "ttt_steps", "sequences", "data_s", "steps", "batch",
                                  "seq", "train_s", "tokens_per_s", "steps_per_s", "loss", "train_acc_last_step"]))
    if "acceptance" in by:
        acc = [{"draft tokens per verify": r["draft_tokens"], "mean acceptance length": f"{r['mean_accept_length']:.3f}",
                "mean accepted drafts": f"{r['mean_accepted']:.3f}",
                "histogram (length 1..k+1, verify steps)": str(r["histogram"])} for r in by["acceptance"]]
        md.append(markdown_table(acc, list(acc[0])))
    if "step_cost" in by:
        cols = [k for k in by["step_cost"][0] if k.endswith("_ms_eager") or k.endswith("_ms_graph")]
        rows_sc = []
        for r in by["step_cost"]:
            row = {"batch": r["batch"], "context": r["context"]}
            for k in cols:
                if k in r:
                    row[k.replace("_ms_", " ms ")] = f"{r[k]:.3f}"
            for mode in ("eager", "graph"):
                if f"c_{mode}" in r:
                    row[f"c {mode}"] = f"{r[f'c_{mode}']:.3f}"
                    sp = r[f"predicted_speedup_{mode}"]
                    best = max(sp, key=sp.get)
                    row[f"model speedup {mode} (best k)"] = f"{sp[best]:.2f}x (k={best})"
            rows_sc.append(row)
        md.append(markdown_table(rows_sc, list(rows_sc[0])))
    if "e2e" in by:
        e2e = [{"draft tokens": r["draft_tokens"], "plain tok/s": f"{r['plain_tok_s']:.1f}",
                "EAGLE-3 tok/s": f"{r['spec_tok_s']:.1f}", "speedup": f"{r['speedup']:.2f}x",
                "mean accept length": f"{r['mean_accept_length']:.3f}",
                "identical sequences (bf16)": f"{r['identical_sequences']}/{r['prompts']}",
                "identical leading tokens": f"{r['identical_prefix_tokens']}/{r['total_tokens']}"} for r in by["e2e"]]
        md.append(markdown_table(e2e, list(e2e[0])))
    if png is not None and "acceptance" in by:
        plot(by, png)
    return "\n".join(md)


def plot(by: dict, png: Path) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    acc = by["acceptance"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / len(acc)
    for i, r in enumerate(acc):
        h = r["histogram"]
        total = sum(h)
        xs = [j + 1 + (i - len(acc) / 2 + 0.5) * width for j in range(len(h))]
        axes[0].bar(xs, [v / total for v in h], width=width,
                    label=f"k={r['draft_tokens']}: mean {r['mean_accept_length']:.2f}")
    axes[0].set_xlabel("acceptance length (tokens per target forward)")
    axes[0].set_ylabel("fraction of verify steps")
    axes[0].set_title("EAGLE-3 acceptance histogram (held-out prompts)")
    axes[0].legend(fontsize=8)
    for ax, phase in ((axes[1], "target_train"), (axes[2], "draft_train")):
        if phase in by:
            r = by[phase][0]
            ys = r["loss_curve"]
            ax.plot([i * r["loss_curve_every"] for i in range(len(ys))], ys)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_title(f"{phase.replace('_', ' ')} loss")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eagle_gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results", help="directory for eagle_gpu.jsonl")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a quick check of the whole path")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is there")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast/inference on the CPU too (CUDA: always)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--e2e-deadline-s", type=float, default=440.0,
                    help="skip the end-to-end phase if this many seconds have passed before it")
    ap.add_argument("--loop-profile", action="store_true",
                    help="only: where the eager speculative loop's time goes (random weights), to DIR/eagle_gpu_loop.jsonl")
    ap.add_argument("--sha", help="git SHA to record (the device's copy of the tree has no .git)")
    ap.add_argument("--report", help="print markdown tables from this JSONL (and write --png) instead of running")
    ap.add_argument("--png", help="with --report: write the plot here")
    args = ap.parse_args(argv)
    if args.loop_profile:
        c = TINY if args.tiny else FULL
        dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        env = dict(versions(), command="python -m benchmarks.eagle_gpu " + " ".join(sys.argv[1:]))
        if args.sha:
            env["git_sha"] = args.sha
        Path(args.out).mkdir(parents=True, exist_ok=True)
        loop_profile(c, dev, args.seed, Results(Path(args.out), env, name=f"{NAME}_loop"))
        return 0
    if args.report:
        print(report(Path(args.report), Path(args.png) if args.png else None))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
