"""Block-sparse baselines that run on the S2O kernel itself (tau = 0, a per-(segment, KV head) list of
selected blocks), so that any difference to S2O comes from the selection alone.

Both select, for each query segment and KV head, key blocks of ``block_size`` among the earlier keys
[0, seg_start) by TOP-CDF: blocks sorted by their probability, kept until the cumulative probability
reaches ``gamma``.  Block probability = softmax over blocks of the mean-pooled block score
mean_{j in block}(sm_scale * qbar_h . k_j) (= qbar_h . mean-pooled key block), averaged over the q heads
of the KV group.  The intra-segment (diagonal) part stays dense, exactly as in S2O.

  * ``topcdf``: physical (contiguous) blocks, no permutation: FlexPrefill / XAttention style
    (their estimators differ: last-query-block attention, antidiagonal sums; the selection rule and the
    block granularity are what is compared here).
  * ``pbs``: PBS-Attn style: inside every key segment of ``segment_size`` keys the keys are first
    permuted by the same token estimate S2O uses (group max of the pooled-query logit), then blocks are
    cut from the permuted order and selected by top-cdf.  (PBS also permutes queries; not done here.)

Both return (rank [n_seg, Hkv, L'] int32, rank_len [n_seg, Hkv] int32) for ``s2o_attention_ref`` and
``s2o_triton.s2o_paged``.
"""

from __future__ import annotations

import torch

from .s2o_ref import segment_range, token_scores


def _top_cdf(block_logit: torch.Tensor, valid: torch.Tensor, G: int, gamma: float):
    """block_logit [n_seg, Hq, nb], valid [n_seg, nb] -> block order [n_seg, Hkv, nb], n_sel [n_seg, Hkv]."""
    n_seg, Hq, nb = block_logit.shape
    prob = torch.softmax(block_logit.float().masked_fill(~valid[:, None, :], float("-inf")), -1)
    prob = torch.nan_to_num(prob, nan=0.0).view(n_seg, Hq // G, G, nb).mean(2)
    p_sorted, order = torch.sort(prob, -1, descending=True)
    cdf = p_sorted.cumsum(-1)
    n_sel = ((cdf < gamma).sum(-1) + 1).minimum(valid.sum(-1)[:, None])
    return order, n_sel


def _seg_starts(q, k, segment_size):
    segs = segment_range(k.shape[0], q.shape[0], segment_size)
    return torch.tensor([s * segment_size for s in segs], device=q.device)


def select_topcdf(q: torch.Tensor, k: torch.Tensor, *, gamma: float, block_size: int, segment_size: int,
                  sm_scale: float):
    """FlexPrefill/XAttention-style top-cdf over contiguous blocks.  q [Tq, Hq, D], k [L, Hkv, D]."""
    G = q.shape[1] // k.shape[1]
    t = token_scores(q, k, segment_size=segment_size, sm_scale=sm_scale)        # [n_seg, Hq, L]
    n_seg, Hq, L = t.shape
    nb = L // block_size
    blk = t[..., : nb * block_size].float().view(n_seg, Hq, nb, block_size).mean(-1)
    seg_starts = _seg_starts(q, k, segment_size)
    valid = torch.arange(nb, device=q.device)[None, :] < (seg_starts // block_size)[:, None]
    order, n_sel = _top_cdf(blk, valid, G, gamma)
    pos = order[..., :, None] * block_size + torch.arange(block_size, device=q.device)
    return pos.flatten(-2).to(torch.int32), (n_sel * block_size).to(torch.int32)


def select_pbs(q: torch.Tensor, k: torch.Tensor, *, gamma: float, block_size: int, segment_size: int,
               sm_scale: float):
    """PBS-style: permute keys inside each key segment by the token estimate, then top-cdf over blocks
    of the permuted order."""
    Hkv = k.shape[1]
    G = q.shape[1] // Hkv
    t = token_scores(q, k, segment_size=segment_size, sm_scale=sm_scale).float()  # [n_seg, Hq, L]
    n_seg, Hq, L = t.shape
    n_ks = L // segment_size
    Lk = n_ks * segment_size                                   # earlier keys are always < n_ks * segment
    est = t[..., :Lk].view(n_seg, Hkv, G, n_ks, segment_size).amax(2)          # [n_seg, Hkv, n_ks, S]
    perm = torch.sort(est, -1, descending=True).indices                         # within key segment
    perm_h = perm.repeat_interleave(G, 1)                                       # [n_seg, Hq, n_ks, S]
    t_perm = torch.gather(t[..., :Lk].view(n_seg, Hq, n_ks, segment_size), -1, perm_h)
    nb = Lk // block_size
    blk = t_perm.view(n_seg, Hq, nb, block_size).mean(-1)
    seg_starts = _seg_starts(q, k, segment_size)
    valid = torch.arange(nb, device=q.device)[None, :] < (seg_starts // block_size)[:, None]
    order, n_sel = _top_cdf(blk, valid, G, gamma)
    phys = (perm + torch.arange(n_ks, device=q.device)[:, None] * segment_size).view(n_seg, Hkv, nb, block_size)
    pos = torch.gather(phys, 2, order[..., None].expand(-1, -1, -1, block_size))
    return pos.flatten(-2).to(torch.int32), (n_sel * block_size).to(torch.int32)
