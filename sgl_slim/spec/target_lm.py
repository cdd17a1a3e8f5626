"""Give a demo checkpoint's language part real next-token structure: a short, seeded training run on the
Python standard library's source (offline), written back over the same tensors in place.

    python -m sgl_slim.spec.target_lm MODEL_DIR [--steps 300] [--seed 0]

A random-weight model mostly repeats itself, which makes draft acceptance numbers meaningless; after this
run the model continues Python code plausibly. Only text weights change (vision / audio towers untouched).
A record of the run is written to ``MODEL_DIR/sgl_slim_lm.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sgl_slim.spec.data import sample_windows, token_stream
from sgl_slim.spec.textlm import TextLM

RECORD_FILE = "sgl_slim_lm.json"
EAGLE_TARGET_LAYERS = 4      # EAGLE-3 fuses 3 layers' outputs, captured at layers <= L-2: L >= 4
EAGLE_TARGET_STEPS = 300


def lm_loss(model: TextLM, batch: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of ``batch`` [B, S]. ``active`` [V'] restricts the softmax to those token
    ids (they must include every label), which keeps a 150k-entry vocabulary affordable on a CPU."""
    hidden, _, _ = model(batch[:, :-1])
    labels = batch[:, 1:]
    if active is None:
        logits = model.logits(hidden)
    else:
        logits = hidden @ model.lm_head.weight[active].t()
        lookup = torch.full((model.cfg.vocab_size,), -1, dtype=torch.long, device=batch.device)
        lookup[active] = torch.arange(active.numel(), device=batch.device)
        labels = lookup[labels]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def make_lm_optimizer(model: TextLM, steps: int, lr: float):
    """AdamW (betas 0.9/0.95, weight decay 0.01), linear warm-up over steps/20, cosine decay -> (params, opt, sched)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    return params, opt, sched


def lm_train_step(model: TextLM, params: list, opt, sched, batch: torch.Tensor, active: torch.Tensor | None = None,
                  amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One optimizer step on ``batch`` [B, S+1] (on the model's device); ``amp_dtype`` (e.g. torch.bfloat16)
    runs the forward under autocast on the batch's device. Returns the detached loss (no host sync)."""
    with torch.autocast(batch.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = lm_loss(model, batch, active)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.detach()


def train_language_model(model_dir: str | Path, *, steps: int = 300, seed: int = 0, batch: int = 16,
                         seq_len: int = 128, lr: float = 3e-3, progress: bool = False) -> dict:
    """Train the text weights of the checkpoint in ``model_dir`` in place; returns the run's record.

    Deterministic for a given (checkpoint, steps, seed, thread count). With a vocabulary over 32k entries
    the softmax runs over the tokens that occur in the training text, and the LM-head rows of all other
    tokens are scaled down (untied heads only) so the trained model never emits them greedily.
    """
    model_dir = Path(model_dir)
    t0 = time.time()
    torch.manual_seed(seed)
    model = TextLM.from_pretrained(model_dir).train()
    stream = token_stream(model_dir, "train", max_tokens=max(200_000, steps * batch * seq_len // 4))
    windows = sample_windows(stream, steps * batch, seq_len + 1, seed)
    active = None
    if model.cfg.vocab_size > 32768:
        active = torch.unique(stream)
    params, opt, sched = make_lm_optimizer(model, steps, lr)
    losses = []
    for step in range(steps):
        loss = lm_train_step(model, params, opt, sched, windows[step * batch: (step + 1) * batch], active)
        losses.append(loss.item())
        if progress and (step % 10 == 0 or step + 1 == steps):
            print(f"target lm step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)",
                  file=sys.stderr)
    if active is not None and not model.cfg.tie_word_embeddings:
        with torch.no_grad():
            inactive = torch.ones(model.cfg.vocab_size, dtype=torch.bool)
            inactive[active] = False
            model.lm_head.weight[inactive] = 0.0
    model.save_text_weights(model_dir)
    record = {"steps": steps, "seed": seed, "batch": batch, "seq_len": seq_len, "lr": lr,
              "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
              "active_vocab": None if active is None else int(active.numel()),
              "seconds": round(time.time() - t0, 1)}
    (model_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def ensure_eagle_target(*, steps: int = EAGLE_TARGET_STEPS, seed: int = 0, progress: bool = False) -> Path:
    """A trained text target for draft work, built once and cached beside the demo models.

    It is the ``demo`` model (tiny Qwen2.5-VL) with ``EAGLE_TARGET_LAYERS`` text layers (the 2-layer default
    cannot feed EAGLE-3 three distinct layers), its language part trained by :func:`train_language_model`.
    """
    from sgl_slim.demo import cache_root, ensure_demo  # noqa: PLC0415

    base = ensure_demo("demo", num_hidden_layers=EAGLE_TARGET_LAYERS)
    out = cache_root() / f"{base.name}-lm{steps}-seed{seed}"
    if (out / RECORD_FILE).is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    train_language_model(tmp, steps=steps, seed=seed, progress=progress)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sgl_slim.spec.target_lm", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?", help="checkpoint to train in place; omitted: build the cached "
                                                 "EAGLE target (4-layer demo) and print its directory")
    ap.add_argument("--steps", type=int, default=EAGLE_TARGET_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.model_dir is None:
        print(ensure_eagle_target(steps=args.steps, seed=args.seed, progress=True))
        return 0
    record = train_language_model(args.model_dir, steps=args.steps, seed=args.seed, progress=True)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
