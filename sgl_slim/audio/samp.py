"""Samp (SA-MAP): adaptive merging of similar neighbouring audio tokens, then diversity pruning (DPP MAP).

Input: one clip's projected audio tokens ``tokens [N, D]`` and statistics of its audio encoder's last-layer
attention. Output: exactly ``keep`` tokens in time order, plus the original token indices behind each one.

Stage 1, merge. Scan left to right; token j joins the current cluster while its mean cosine similarity to the
cluster's members is >= ``merge_threshold``, else it starts a new cluster. A join is refused when it would leave
fewer than ``keep`` clusters (the clusters so far plus the tokens still to scan), so merging never undershoots
the count and the final count is always exactly ``keep``. Clusters are therefore contiguous runs of time.
A cluster becomes the weighted mean of its members, weights = ``merge_weight`` (column mean of the head-max
attention). ``merge_threshold > 1`` merges nothing.

Stage 2, prune. Relevance of a cluster = mean of its members' ``relevance`` (head-mean attention diagonal).
Kernel ``L' = diag(a) L diag(a)`` with ``L`` the cosine similarity of the merged tokens. Greedy DPP MAP
(Chen et al. 2018, incremental Cholesky) picks exactly ``keep`` clusters, returned in time order. When every
remaining candidate's conditional gain is <= ``DEGENERATE_GAIN * max(diag L')`` (duplicates: no more diversity
to gain), the remaining picks are the unselected clusters of largest ``diag L'`` (earlier first on ties).

``attn`` may be either a :class:`SampAttention` (the two per-token statistics) or the last encoder layer's
attention probabilities ``[H, N, N]`` (rows = queries) at token resolution; :func:`attention_stats` turns the
latter into the former. For Whisper-style encoders whose attention runs at a finer frame rate than the tokens,
:mod:`sgl_slim.audio.encoder_attention` computes the statistics per frame and pools them to tokens.

``*_ref`` functions are plain-loop float64 references; the others are the vectorised fast path (float64
arithmetic on the N x N Gram matrix, so both take the same decisions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DEGENERATE_GAIN = 1e-6   # relative conditional gain below which DPP MAP has no diversity left (above fp32 noise)
_NORM_EPS = 1e-12        # as F.normalize: a zero token has cosine similarity 0 with everything


@dataclass(frozen=True)
class SampAttention:
    """Per-token statistics of the last encoder layer's attention (both ``[N]``, non-negative).

    merge_weight: column mean of the head-max attention (how much the clip attends to token i): merge weights.
    relevance: head-mean attention diagonal (how much token i attends to itself): DPP relevance.
    """

    merge_weight: Tensor
    relevance: Tensor


def attention_stats(probs: Tensor) -> SampAttention:
    """``probs [H, N, N]`` attention probabilities (rows = queries) -> :class:`SampAttention`."""
    if probs.dim() != 3 or probs.shape[1] != probs.shape[2]:
        raise ValueError(f"attention probabilities must be [H, N, N], got shape {tuple(probs.shape)}")
    probs = probs.float()
    return SampAttention(merge_weight=probs.amax(dim=0).mean(dim=0), relevance=probs.mean(dim=0).diagonal())


def _check_args(tokens: Tensor, attn, keep: int, merge_threshold: float) -> SampAttention:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a [N, D] tensor, got {getattr(tokens, 'shape', type(tokens))}")
    if not tokens.is_floating_point():
        raise ValueError(f"tokens must be floating point, got {tokens.dtype}")
    n = tokens.shape[0]
    if n < 1:
        raise ValueError("tokens is empty: Samp needs at least one audio token")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an int (tokens to keep), got {type(keep).__name__}")
    if not (1 <= keep <= n):
        raise ValueError(f"keep must be in [1, N={n}], got {keep}")
    if not bool(torch.isfinite(tokens).all()):
        raise ValueError("tokens must be finite (the audio encoder returned NaN or inf)")
    if not isinstance(merge_threshold, (int, float)) or merge_threshold != merge_threshold:
        raise ValueError(f"merge_threshold must be a number, got {merge_threshold!r}")
    stats = attn if isinstance(attn, SampAttention) else None
    if stats is None:
        if not isinstance(attn, Tensor):
            raise ValueError(f"attn must be SampAttention or a [H, N, N] tensor, got {type(attn).__name__}")
        if attn.dim() != 3 or attn.shape[1:] != (n, n):
            raise ValueError(f"attn must be [H, {n}, {n}] for {n} tokens, got {tuple(attn.shape)}")
        stats = attention_stats(attn)
    for name in ("merge_weight", "relevance"):
        v = getattr(stats, name)
        if v.shape != (n,):
            raise ValueError(f"attn.{name} must be [{n}] for {n} tokens, got {tuple(v.shape)}")
        if not torch.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"attn.{name} must be finite and non-negative")
    return stats


# ---------------------------------------------------------------------------------------------------------
# References: plain loops, float64.
# ---------------------------------------------------------------------------------------------------------

def merge_clusters_ref(tokens: Tensor, *, keep: int, merge_threshold: float) -> list[list[int]]:
    """Left-to-right clustering; returns clusters as lists of token indices (contiguous, in time order)."""
    n = tokens.shape[0]
    x = tokens.double()
    unit = [x[i] / max(float(x[i].norm()), _NORM_EPS) for i in range(n)]
    clusters = [[0]]
    for j in range(1, n):
        members = clusters[-1]
        mean_sim = sum(float(torch.dot(unit[j], unit[i])) for i in members) / len(members)
        room = len(clusters) + (n - 1 - j) >= keep       # joining still leaves >= keep clusters possible
        if merge_threshold <= 1 and room and mean_sim >= merge_threshold:
            members.append(j)
        else:
            clusters.append([j])
    return clusters


def dpp_select_ref(kernel: Tensor, keep: int) -> list[int]:
    """Greedy DPP MAP by its definition: each step adds the item with the largest det gain
    det(L_{S+i}) / det(L_S) = L_ii - L_iS L_SS^-1 L_Si. Returns sorted indices."""
    k = kernel.double()
    c = k.shape[0]
    floor = DEGENERATE_GAIN * float(k.diagonal().max())
    chosen: list[int] = []
    while len(chosen) < keep:
        best, best_gain = -1, -float("inf")
        for i in range(c):
            if i in chosen:
                continue
            gain = float(k[i, i])
            if chosen:
                s = torch.tensor(chosen)
                gain -= float(k[i, s] @ torch.linalg.solve(k[s][:, s], k[s, i]))
            if gain > best_gain:
                best, best_gain = i, gain
        if best_gain <= floor:
            break
        chosen.append(best)
    rest = sorted((i for i in range(c) if i not in chosen), key=lambda i: (-float(k[i, i]), i))
    chosen += rest[: keep - len(chosen)]
    return sorted(chosen)


def samp_compress_ref(tokens: Tensor, attn, *, keep: int, merge_threshold: float
                      ) -> tuple[Tensor, list[list[int]]]:
    """Reference Samp: same contract as :func:`samp_compress`."""
    stats = _check_args(tokens, attn, keep, merge_threshold)
    x = tokens.double()
    w = stats.merge_weight.double()
    r = stats.relevance.double()
    clusters = merge_clusters_ref(tokens, keep=keep, merge_threshold=merge_threshold)
    merged, rel = [], []
    for members in clusters:
        if len(members) == 1:
            merged.append(x[members[0]])
        else:
            wsum = sum(float(w[i]) for i in members)
            weights = [float(w[i]) / wsum for i in members] if wsum > 0 else [1 / len(members)] * len(members)
            merged.append(sum(wt * x[i] for wt, i in zip(weights, members)))
        rel.append(sum(float(r[i]) for i in members) / len(members))
    c = len(clusters)
    kernel = torch.empty(c, c, dtype=torch.float64)
    for a in range(c):
        for b in range(c):
            na, nb = float(merged[a].norm()), float(merged[b].norm())
            cos = float(torch.dot(merged[a], merged[b])) / (max(na, _NORM_EPS) * max(nb, _NORM_EPS))
            kernel[a, b] = rel[a] * cos * rel[b]
    chosen = dpp_select_ref(kernel, keep)
    out = torch.stack([merged[i] for i in chosen]).to(tokens.dtype)
    return out, [clusters[i] for i in chosen]


# ---------------------------------------------------------------------------------------------------------
# Fast path.
# ---------------------------------------------------------------------------------------------------------

def merge_clusters(tokens: Tensor, *, keep: int, merge_threshold: float) -> Tensor:
    """Fast left-to-right clustering. Returns ``starts [C]`` (int64): cluster c covers tokens
    ``starts[c] : starts[c+1]`` (the last one runs to N)."""
    n = tokens.shape[0]
    if merge_threshold > 1 or keep == n or n == 1:
        return torch.arange(n, dtype=torch.int64)
    unit = F.normalize(tokens.double(), dim=-1, eps=_NORM_EPS)               # [N, D]
    gram = unit @ unit.T                                                      # [N, N] cosine similarity
    # prefix[j, k] = sum_{i < k} gram[j, i]: mean similarity of j to the run [s, j) in O(1)
    prefix = torch.nn.functional.pad(gram.cumsum(dim=1), (1, 0)).cpu().numpy()
    starts = [0]
    s = 0
    for j in range(1, n):
        mean_sim = (prefix[j, j] - prefix[j, s]) / (j - s)
        if len(starts) + (n - 1 - j) >= keep and mean_sim >= merge_threshold:
            continue
        starts.append(j)
        s = j
    return torch.tensor(starts, dtype=torch.int64)


def dpp_select(kernel: Tensor, keep: int) -> Tensor:
    """Fast greedy DPP MAP with an incremental Cholesky factor (Chen, Zhang, Zhou 2018).
    ``kernel [C, C]`` PSD; returns ``keep`` sorted indices (int64). Same rule as :func:`dpp_select_ref`.
    A CUDA kernel of up to ``dpp_triton.MAX_CANDIDATES`` rows runs every pick in one Triton program; any other
    here on the host, pick by pick (a pick-by-pick loop on a GPU waits on a read-back per pick: 2.7x slower than
    the host on an H200, benchmarks/samp.md)."""
    c = kernel.shape[0]
    k = kernel.double()
    diag = k.diagonal()
    floor = DEGENERATE_GAIN * float(diag.max())
    if k.is_cuda and c <= _dpp_triton().MAX_CANDIDATES:
        picks = _dpp_triton().dpp_picks_triton(k, keep, floor)
        return _fill_degenerate(diag.cpu(), picks.cpu().tolist(), keep)
    k, diag = k.cpu(), diag.cpu()
    cis = k.new_zeros(keep, c)                   # rows of the Cholesky factor, one per pick
    gain = diag.clone()                          # d_i^2: conditional gain of each candidate
    taken = torch.zeros(c, dtype=torch.bool, device=k.device)
    chosen: list[int] = []
    for t in range(keep):
        j = int(gain.masked_fill(taken, -float("inf")).argmax())
        if float(gain[j]) <= floor:
            break
        chosen.append(j)
        taken[j] = True
        e = (k[j] - cis[:t, j] @ cis[:t]) / gain[j].sqrt()                    # [C]
        cis[t] = e
        gain = gain - e * e
    return _fill_degenerate(diag, chosen, keep)


def _fill_degenerate(diag: Tensor, chosen: list[int], keep: int) -> Tensor:
    """Degenerate (no diversity left): fill the picks up to ``keep`` by largest diagonal, earlier first;
    sorted int64."""
    if len(chosen) < keep:
        taken = torch.zeros(diag.shape[0], dtype=torch.bool, device=diag.device)
        taken[chosen] = True
        order = torch.sort(diag.masked_fill(taken, -float("inf")), descending=True, stable=True).indices
        chosen = chosen + order[: keep - len(chosen)].tolist()
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def _dpp_triton():
    from sgl_slim.audio import dpp_triton  # noqa: PLC0415 (Triton only where a CUDA kernel asks for it)

    return dpp_triton


def samp_compress(tokens: Tensor, attn, *, keep: int, merge_threshold: float
                  ) -> tuple[Tensor, list[list[int]]]:
    """Compress one clip's audio tokens to exactly ``keep`` tokens.

    tokens: [N, D] projected audio tokens (any float dtype, any device).
    attn: :class:`SampAttention` (``merge_weight [N]``, ``relevance [N]``) or probabilities ``[H, N, N]``.
    keep: tokens to return, 1 <= keep <= N (the serving integration uses ``SampConfig.keep_count(N)``).
    merge_threshold: mean cosine similarity for joining a cluster; > 1 merges nothing.
    Returns (tokens_out [keep, D] in tokens.dtype, kept_index_groups: for each output token, in time order,
    the original token indices it stands for). ``keep == N`` returns ``tokens`` unchanged (bit for bit).
    Raises ValueError for non-finite tokens or statistics, negative statistics, N = 0 or keep outside [1, N];
    degenerate finite clips (all-zero or identical tokens, zero statistics, N = 1) compress normally.
    """
    stats = _check_args(tokens, attn, keep, merge_threshold)
    n = tokens.shape[0]
    starts = merge_clusters(tokens, keep=keep, merge_threshold=merge_threshold)
    c = starts.numel()
    if c == n and keep == n:
        return tokens.clone(), [[i] for i in range(n)]
    dev = tokens.device
    ends = torch.cat([starts[1:], torch.tensor([n])])
    sizes = (ends - starts).to(dev)
    cid = torch.repeat_interleave(torch.arange(c, device=dev), sizes)        # [N] cluster of each token
    x = tokens.double()
    w = stats.merge_weight.to(dev, torch.float64)
    wsum = x.new_zeros(c).index_add_(0, cid, w)                               # [C]
    uniform = wsum[cid] <= 0                                                  # all-zero weights: plain mean
    w_norm = torch.where(uniform, 1.0 / sizes[cid].double(), w / wsum[cid].clamp_min(1e-300))
    merged = x.new_zeros(c, x.shape[1]).index_add_(0, cid, w_norm[:, None] * x)   # [C, D]
    single = sizes == 1
    merged[single] = x[starts.to(dev)[single]]                                # singletons stay bit-exact
    rel = x.new_zeros(c).index_add_(0, cid, stats.relevance.to(dev, torch.float64)) / sizes.double()
    if c == keep:
        pick = torch.arange(c)
    else:
        unit = F.normalize(merged, dim=-1, eps=_NORM_EPS)
        kernel = rel[:, None] * (unit @ unit.T) * rel[None, :]               # [C, C] diag(a) L diag(a)
        pick = dpp_select(kernel, keep)
    out = merged[pick.to(dev)].to(tokens.dtype)
    starts_l, ends_l = starts.tolist(), ends.tolist()
    return out, [list(range(starts_l[i], ends_l[i])) for i in pick.tolist()]
