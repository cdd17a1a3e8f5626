"""Acceptance statistics of chain speculative decoding, and an offline simulation of it.

Acceptance length of one verify step = accepted draft tokens + 1 (the target's own token after the last
accepted one), i.e. tokens emitted per target forward. SGLang reports per request
``spec_accept_length = completion_tokens / spec_verify_ct``; the first completion token comes from prefill, not
from a verify, so that ratio is (1 + sum of acceptance lengths) / verifies.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


def accepted_prefix(draft: list[int], target: list[int]) -> int:
    """Number of leading draft tokens equal to the target's tokens (greedy verification)."""
    n = 0
    for d, t in zip(draft, target):
        if d != t:
            break
        n += 1
    return n


@dataclass
class AcceptanceStats:
    lengths: list[int] = field(default_factory=list)    # acceptance length (accepted + 1) per verify step

    def add(self, length: int) -> None:
        self.lengths.append(length)

    @property
    def verifies(self) -> int:
        return len(self.lengths)

    @property
    def mean_length(self) -> float:
        return sum(self.lengths) / len(self.lengths) if self.lengths else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean accepted draft tokens per verify (acceptance length minus the bonus token)."""
        return self.mean_length - 1.0 if self.lengths else 0.0

    def histogram(self, max_length: int) -> list[int]:
        """counts[k - 1] = verify steps whose acceptance length was k, for k = 1..max_length."""
        counts = Counter(self.lengths)
        bad = [k for k in counts if not 1 <= k <= max_length]
        if bad:
            raise ValueError(f"acceptance lengths {bad} outside 1..{max_length}")
        return [counts.get(k, 0) for k in range(1, max_length + 1)]


def server_accept_length(completion_tokens: int, verify_ct: int) -> float:
    """SGLang's per-request ``spec_accept_length`` (tokens per verify, the prefill token included)."""
    if verify_ct <= 0:
        raise ValueError(f"verify_ct must be > 0, got {verify_ct}")
    return completion_tokens / verify_ct


@torch.no_grad()
def simulate_chain(target, draft, prompts: torch.Tensor, max_new_tokens: int, steps: int) -> AcceptanceStats:
    """Chain speculative decoding of ``prompts`` [B, P] with ``steps`` draft tokens per verify, greedy.

    Verification is lossless, so the committed text is the target's own greedy continuation; the
    simulation walks it, asks the draft for ``steps`` tokens at every verify point exactly as SGLang's
    EAGLE-3 worker does (draft extend over target features, then chain decode), and counts matches.
    """
    from sgl_slim.spec.draft import fuse_aux  # noqa: PLC0415 (avoid a cycle at import time)

    stats = AcceptanceStats()
    weight = getattr(getattr(target, "embed_tokens", None), "weight", None)
    if weight is not None:                                      # a TextLM: prompts go to its device
        prompts = prompts.to(weight.device)
    # ``steps`` extra tokens: the last verify may accept drafts past max_new_tokens (SGLang counts them too,
    # then cuts the output), so the truth must reach that far.
    gen = target.generate_greedy(prompts, max_new_tokens + steps)
    seqs = torch.cat([prompts, gen], dim=1)                     # [B, P + G + steps]
    _, hiddens, _ = target(seqs)
    aux = fuse_aux(hiddens, draft.cfg.aux_layer_ids)
    k0, v0, g, logits = draft.step0(aux, seqs)
    end = prompts.shape[1] + max_new_tokens
    for b in range(seqs.shape[0]):
        n = prompts.shape[1] + 1                                # committed after prefill: prompt + 1 token
        while n < end:
            col = n - 2                                         # features h_{n-2}, token x_{n-1}
            proposal = draft.propose(k0[b: b + 1], v0[b: b + 1], g[b: b + 1], logits[b: b + 1], col, steps)
            length = accepted_prefix(proposal[0].tolist(), seqs[b, n: n + steps].tolist()) + 1
            stats.add(length)
            n += length
    return stats
