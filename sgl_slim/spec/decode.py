"""A real chain speculative decoding loop in plain torch (batch 1, greedy), with KV caches for target and draft.

It exists to measure end-to-end speed against plain greedy decoding (``TextLM.generate_greedy``) on any
device, and to check losslessness: its output must equal the target's own greedy output. Per verify it
does what SGLang's EAGLE-3 worker does with topk 1: the draft proposes ``steps`` tokens (its first from the
last extend, then ``steps - 1`` chain decode steps), the target scores the last committed token plus the
proposals in one forward over its KV cache, the longest matching prefix plus the target's own next token
is committed, both caches are cut back / extended with the accepted positions only.
"""

from __future__ import annotations

import time

import torch

from sgl_slim.spec.draft import Eagle3Draft, fuse_aux
from sgl_slim.spec.metrics import AcceptanceStats, accepted_prefix
from sgl_slim.spec.textlm import TextLM


@torch.no_grad()
def speculative_greedy(target: TextLM, draft: Eagle3Draft, prompt: torch.Tensor, max_new_tokens: int,
                       steps: int, profile: dict | None = None) -> tuple[torch.Tensor, AcceptanceStats]:
    """Greedy continuation of ``prompt`` [1, P] -> (new tokens [1, max_new_tokens], acceptance stats).

    Acceptance lengths are counted like :func:`sgl_slim.spec.metrics.simulate_chain` (one per verify,
    accepted drafts + 1, the last verify may run past ``max_new_tokens``), so the two agree exactly when
    the arithmetic does. ``profile`` (a dict) accumulates wall seconds per phase of the verify loop
    ("draft", "verify", "accept", "extend"), synchronizing the device at each phase boundary.
    """
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"speculative_greedy decodes one sequence: prompt must be [1, P], got {tuple(prompt.shape)}")
    if steps < 1 or max_new_tokens < 1:
        raise ValueError(f"need steps >= 1 and max_new_tokens >= 1, got {steps}, {max_new_tokens}")
    dev = target.embed_tokens.weight.device
    prompt = prompt.to(dev)
    p_len = prompt.shape[1]
    layers = draft.cfg.aux_layer_ids
    stats = AcceptanceStats()

    hidden, hiddens, past = target(prompt)                          # target cache: positions 0..P-1
    last = target.logits(hidden[:, -1]).argmax(-1)                  # x_P [1], not yet fed to the target
    out = [last]
    next_tokens = torch.cat([prompt[:, 1:], last[:, None]], dim=1)  # draft column t: h_t and x_{t+1}
    dcache, g, logits = draft.extend(fuse_aux(hiddens, layers), next_tokens, 0, None)
    g_last, lg_last = g[:, -1:], logits[:, -1]
    n = p_len + 1                                                   # committed tokens
    clock = _Clock(profile, dev)
    while n - p_len < max_new_tokens:
        clock.start()
        col = n - 2                                                 # draft cache holds columns 0..col
        tok = draft.target_ids(lg_last.argmax(-1))
        drafts = [tok]
        hidden_d, diag_k, diag_v = g_last, [], []
        qcol = torch.full((1,), col, device=dev)
        for i in range(1, steps):
            pos = torch.full((1, 1), col + i, device=dev)
            hidden_d, tok = draft.chain_step(tok, hidden_d, dcache[0], dcache[1], diag_k, diag_v, qcol, pos)
            drafts.append(tok)
        proposal = torch.stack(drafts, dim=1)                       # [1, steps]: guesses for x_n..x_{n+steps-1}
        clock.lap("draft")
        feed = torch.cat([last[:, None], proposal], dim=1)          # positions n-1 .. n-1+steps
        vh, vhs, vpast = target(feed, past, start=n - 1)
        pred = target.logits(vh).argmax(-1)                         # [1, steps+1]: the target's x_n..x_{n+steps}
        clock.lap("verify")
        accepted = accepted_prefix(proposal[0].tolist(), pred[0, :steps].tolist())
        stats.add(accepted + 1)
        keep = n + accepted                                         # target positions 0..n-1+accepted are right
        past = [(k[:, :, :keep], v[:, :, :keep]) for k, v in vpast]
        new = pred[:, : accepted + 1]                               # accepted drafts (== pred) + the bonus token
        clock.lap("accept")
        dcache, g, logits = draft.extend(fuse_aux(vhs, layers)[:, : accepted + 1], new, n - 1, dcache)
        g_last, lg_last = g[:, -1:], logits[:, -1]
        last = pred[:, accepted]
        out.extend(new[:, j] for j in range(accepted + 1))
        n += accepted + 1
        clock.lap("extend")
    return torch.stack(out, dim=1)[:, :max_new_tokens], stats


class _Clock:
    """Per-phase wall time into a dict (no-op without one); synchronizes CUDA at each boundary."""

    def __init__(self, profile: dict | None, dev: torch.device):
        self.profile, self.dev, self.t = profile, dev, 0.0

    def _now(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return time.perf_counter()

    def start(self) -> None:
        if self.profile is not None:
            self.t = self._now()
            self.profile["verifies"] = self.profile.get("verifies", 0) + 1

    def lap(self, name: str) -> None:
        if self.profile is not None:
            now = self._now()
            self.profile[name] = self.profile.get(name, 0.0) + now - self.t
            self.t = now
