"""Train an EAGLE-3 draft for a target and export it in SGLang's format.

    python -m sgl_slim.spec.train --target PATH --out DIR [--steps 400] [--ttt-steps 4] [--draft-vocab 2048]

Data: windows of Python standard-library source (files disjoint from the target's own training text) as
prompts, continued greedily by the target itself; the draft learns the target's greedy next token.
Training-time test unrolls ``--ttt-steps`` draft steps with loss weights 0.8^i. A checkpoint
(``DIR/train_state.pt``) is written every ``--save-every`` steps and resumed from automatically. At the end
the draft is exported to ``DIR`` (config.json + model.safetensors) and an offline simulation of SGLang's
chain drafting prints the acceptance length on held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from sgl_slim.spec.data import sample_windows, token_stream
from sgl_slim.spec.draft import DraftConfig, Eagle3Draft, fuse_aux, ttt_loss
from sgl_slim.spec.export import export_eagle3
from sgl_slim.spec.metrics import simulate_chain
from sgl_slim.spec.textlm import TextLM

STATE_FILE = "train_state.pt"
DATA_FILE = "train_data.pt"


def build_dataset(target: TextLM, target_dir: Path, *, sequences: int, prompt_len: int, gen_len: int,
                  aux_layer_ids: tuple[int, ...], seed: int, batch: int = 32) -> dict:
    """Prompts continued by the target -> tokens [N, P+G], aux features [N, P+G, A*H], labels [N, P+G],
    on the target's device (aux in the target's dtype). ``target_dir`` only provides the tokenizer."""
    stream = token_stream(target_dir, "draft", max_tokens=400_000)
    prompts = sample_windows(stream, sequences, prompt_len, seed).to(target.embed_tokens.weight.device)
    tokens, aux, labels = [], [], []
    with torch.no_grad():
        for i in range(0, sequences, batch):
            p = prompts[i: i + batch]
            seq = torch.cat([p, target.generate_greedy(p, gen_len)], dim=1)
            hidden, hiddens, _ = target(seq)
            tokens.append(seq)
            aux.append(fuse_aux(hiddens, aux_layer_ids))
            labels.append(target.logits(hidden).argmax(-1))     # the target's greedy next token per position
    return {"tokens": torch.cat(tokens), "aux": torch.cat(aux), "labels": torch.cat(labels)}


def choose_draft_vocab(labels: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent target next tokens (ties: lower id first), padded with low ids -> [size]."""
    counts = torch.bincount(labels.flatten(), minlength=vocab_size).float()
    counts = counts - torch.arange(vocab_size, device=counts.device) * 1e-9   # deterministic tie break
    return counts.topk(size).indices.sort().values


def make_draft_optimizer(draft: Eagle3Draft, steps: int, lr: float):
    """AdamW, 20-step warm-up, linear decay to 5% -> (params, opt, sched)."""
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    return params, opt, sched


def draft_train_step(draft: Eagle3Draft, params: list, opt, sched, aux: torch.Tensor, tokens: torch.Tensor,
                     labels: torch.Tensor, ttt_steps: int, amp_dtype: torch.dtype | None = None,
                     with_acc: bool = True):
    """One training-time-test step (loss weights 0.8^i) -> (detached loss, per-step accuracies or []).

    aux [B, T, A*Ht], tokens [B, T], labels [B, T] draft ids; ``amp_dtype`` runs the forward under autocast."""
    with torch.autocast(aux.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = draft.forward_ttt(aux, tokens, ttt_steps)
        loss, accs = ttt_loss(logits, labels, with_acc=with_acc)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.detach(), accs


def train_draft(target_dir: str | Path, out_dir: str | Path, *, steps: int = 400, ttt_steps: int = 4,
                draft_vocab: int = 2048, batch: int = 16, lr: float = 2e-3, sequences: int = 512,
                prompt_len: int = 48, gen_len: int = 80, eval_prompts: int = 16, eval_tokens: int = 64,
                eval_steps: int = 3, save_every: int = 50, seed: int = 0, progress: bool = True) -> dict:
    """Train (or resume), export, evaluate. Returns {"loss_first", "loss_last", "accept_length", ...}."""
    from tqdm import tqdm  # noqa: PLC0415 (CLI dependency)

    target_dir, out = Path(target_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    target = TextLM.from_pretrained(target_dir).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    cfg = DraftConfig.for_target(target.cfg, draft_vocab)

    data_path = out / DATA_FILE
    if data_path.is_file():
        data = torch.load(data_path)
    else:
        t0 = time.time()
        data = build_dataset(target, target_dir, sequences=sequences, prompt_len=prompt_len, gen_len=gen_len,
                             aux_layer_ids=cfg.aux_layer_ids, seed=seed)
        torch.save(data, data_path)
        print(f"data: {sequences} target continuations of {prompt_len}+{gen_len} tokens in {time.time() - t0:.1f} s",
              file=sys.stderr)

    draft = Eagle3Draft(cfg)
    draft.embed_tokens.weight.data.copy_(target.embed_tokens.weight)
    draft.set_vocab(choose_draft_vocab(data["labels"], cfg.draft_vocab_size, cfg.vocab_size))
    labels = draft.draft_ids(data["labels"])
    params, opt, sched = make_draft_optimizer(draft, steps, lr)
    start, history = 0, []
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path)
        draft.load_state_dict(state["draft"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"])
        print(f"resumed from {state_path} at step {start}", file=sys.stderr)

    n = data["tokens"].shape[0]
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="draft", unit="step")
    for step in bar:
        idx = torch.randint(0, n, (batch,))
        loss, accs = draft_train_step(draft, params, opt, sched, data["aux"][idx], data["tokens"][idx], labels[idx],
                                      ttt_steps)
        history.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=" ".join(f"{a:.2f}" for a in accs))
        if (step + 1) % save_every == 0 or step + 1 == steps:
            torch.save({"draft": draft.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1, "history": history, "rng": torch.get_rng_state()}, state_path)

    export_eagle3(draft, out)
    stream = token_stream(target_dir, "eval", max_tokens=100_000)
    prompts = sample_windows(stream, eval_prompts, prompt_len, seed + 1)
    stats = simulate_chain(target, draft.eval(), prompts, eval_tokens, eval_steps)
    result = {
        "steps": steps, "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None,
        "eval_draft_steps": eval_steps, "accept_length": stats.mean_length, "mean_accepted": stats.mean_accepted,
        "histogram": stats.histogram(eval_steps + 1), "verifies": stats.verifies,
    }
    (out / "train_result.json").write_text(json.dumps(result, indent=2) + "\n")
    data_path.unlink(missing_ok=True)       # large and only needed to resume an unfinished run
    print(f"eval: {eval_prompts} held-out prompts x {eval_tokens} tokens, {eval_steps} draft tokens per verify: "
          f"mean acceptance length {stats.mean_length:.3f} (tokens per target forward), "
          f"histogram (length 1..{eval_steps + 1}) {result['histogram']}")
    return result


EAGLE_DRAFT_STEPS = 200


def ensure_eagle_draft(*, steps: int = EAGLE_DRAFT_STEPS, seed: int = 0, progress: bool = False) -> Path:
    """A draft for :func:`sgl_slim.spec.target_lm.ensure_eagle_target`, trained once and cached beside it."""
    from sgl_slim.spec.target_lm import ensure_eagle_target  # noqa: PLC0415

    target = ensure_eagle_target(progress=progress)
    out = target.with_name(f"{target.name}-eagle3-{steps}-seed{seed}")
    if (out / "train_result.json").is_file():
        return out
    work = out.with_name(out.name + ".partial")         # resumable: a rerun continues from its checkpoint
    train_draft(target, work, steps=steps, seed=seed, progress=progress)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sgl_slim.spec.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="target checkpoint directory (HF format)")
    ap.add_argument("--out", required=True, help="output directory: the exported draft (+ training state)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--ttt-steps", type=int, default=4, help="draft steps unrolled in training (loss weight 0.8^i)")
    ap.add_argument("--draft-vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--sequences", type=int, default=512, help="target continuations generated for training")
    ap.add_argument("--eval-steps", type=int, default=3, help="draft tokens per verify in the final evaluation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_draft(args.target, args.out, steps=args.steps, ttt_steps=args.ttt_steps, draft_vocab=args.draft_vocab,
                batch=args.batch, lr=args.lr, sequences=args.sequences, eval_steps=args.eval_steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
