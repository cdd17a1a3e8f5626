"""Training-free, query-agnostic importance signals for IDPruner, computed from the merged vision
embeddings alone (what ``get_image_feature`` returns), so the serving path needs no extra hook into the
vision tower.

- "norm":     L2 norm of each token's embedding. O(N * D).
- "distinct": 1 - cos(v_i, mean direction): how far a token sits from the image's average. O(N * D).
- "attn":     attention each token receives under a weight-free self-attention over the embeddings
              (softmax(v v^T / sqrt(D)), averaged over queries). O(N^2 * D); a stand-in for "attention in
              the last vision layer" that needs no access to the tower's q/k.

``benchmarks/idpruner_quality.py`` measures them; DEFAULT_IMPORTANCE is the one it supports.
"""

from __future__ import annotations

import math

import torch

IMPORTANCE_KINDS = ("norm", "distinct", "attn")
DEFAULT_IMPORTANCE = "norm"


def compute_importance(features: torch.Tensor, kind: str = DEFAULT_IMPORTANCE) -> torch.Tensor:
    """[N] fp32 importance (higher = keep) from features [N, D]."""
    if features.dim() != 2:
        raise ValueError(f"importance: features must be [N, D], got {tuple(features.shape)}")
    f = features.float()
    if kind == "norm":
        return f.norm(dim=1)
    if kind == "distinct":
        unit = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        mean = unit.mean(dim=0)
        mean = mean / mean.norm().clamp_min(1e-12)
        return 1.0 - unit @ mean
    if kind == "attn":
        logits = (f @ f.T) / math.sqrt(f.shape[1])                 # [N(query), N(key)]
        return torch.softmax(logits, dim=1).mean(dim=0)             # attention received per key
    raise ValueError(f"importance: kind must be one of {IMPORTANCE_KINDS}, got {kind!r}")
