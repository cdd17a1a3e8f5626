"""Quality proxies for a kept token set (real VLM weights cannot be evaluated here), and the selections
IDPruner is compared with.

- coverage: mean over ALL tokens of the max cosine similarity to a kept token (1 = every token has an
  identical kept neighbour);
- importance mass retained: sum of importance over kept tokens / sum over all tokens.
"""

from __future__ import annotations

import torch

from .idpruner import cosine_gram, normalize_importance


def coverage(features: torch.Tensor, kept: torch.Tensor, *, reduce: str = "mean") -> float:
    """Mean (or, with reduce="min", worst case) over all N tokens of max_{j in kept} cos(v_i, v_j)."""
    unit = features.float()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    nearest = (unit @ unit[kept].T).max(dim=1).values                  # [N]
    if reduce not in ("mean", "min"):
        raise ValueError(f"coverage: reduce must be 'mean' or 'min', got {reduce!r}")
    return float(nearest.mean() if reduce == "mean" else nearest.min())


def importance_mass(importance: torch.Tensor, kept: torch.Tensor) -> float:
    """Share of the (min-max normalised) importance held by the kept tokens."""
    imp = normalize_importance(importance)
    total = float(imp.sum())
    return float(imp[kept].sum()) / total if total > 0 else 1.0


def select_topk(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` most important tokens, sorted (ties to the lower index)."""
    order = torch.argsort(-importance.float(), stable=True)
    return torch.sort(order[:keep]).values


def select_random(n: int, keep: int, *, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=gen)[:keep]).values


def select_maxmin(features: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune-style max-min diversity: start from token 0's farthest-point walk, each step taking the token
    whose nearest kept neighbour is least similar (min over i of max cosine; cosine distance 1 - cos)."""
    gram = cosine_gram(features)
    n = gram.shape[0]
    picked = torch.zeros(n, dtype=torch.bool)
    # DivPrune's first pick: the token with the smallest total similarity to the others.
    first = int(torch.argmin(gram.sum(dim=1)))
    picked[first] = True
    max_sim = gram[first].clone()
    order = [first]
    for _ in range(keep - 1):
        idx = int(torch.argmin(max_sim.masked_fill(picked, float("inf"))))
        order.append(idx)
        picked[idx] = True
        torch.maximum(max_sim, gram[idx], out=max_sim)
    return torch.sort(torch.tensor(order)).values
