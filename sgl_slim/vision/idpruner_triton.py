"""The IDPruner greedy loop as ONE single-program Triton kernel: no host sync, no launch per pick.

Each pick is one pass over the N tokens: fold the previous pick's cosine row into the running max
similarity, mask picked tokens, and take the block-wise argmax (ties to the lower index). The cosine rows
come from a precomputed [N, N] Gram matrix (one GEMM, tensor cores), so a pick reads N floats instead of N x D.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mmr_greedy_kernel(
    gram_ptr, imp_ptr, max_sim_ptr, order_ptr,
    N, keep, stride_gm,
    lam, one_minus_lam,
    BLOCK_N: tl.constexpr,
):
    # order[0] holds the first pick; max_sim starts at -inf and lives in global scratch (L1/L2 resident).
    # A picked token is marked by max_sim = +inf, so its score is forced to -inf below.
    prev = tl.load(order_ptr).to(tl.int64)
    for k in range(1, keep):
        best_val = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.full((), 0, tl.int64)
        row_ptr = gram_ptr + prev * stride_gm
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask = offs_n < N
            cos = tl.load(row_ptr + offs_n, mask=mask, other=0.0)
            m_i = tl.load(max_sim_ptr + offs_n, mask=mask, other=float("inf"))
            m_i = tl.maximum(m_i, cos)
            m_i = tl.where(offs_n == prev, float("inf"), m_i)
            tl.store(max_sim_ptr + offs_n, m_i, mask=mask)
            imp = tl.load(imp_ptr + offs_n, mask=mask, other=0.0)
            score = lam * imp - one_minus_lam * m_i
            score = tl.where(m_i == float("inf"), float("-inf"), score)
            blk_val, blk_idx = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            better = blk_val > best_val          # strict: an earlier block wins ties
            best_idx = tl.where(better, start + blk_idx.to(tl.int64), best_idx)
            best_val = tl.where(better, blk_val, best_val)
        tl.store(order_ptr + k, best_idx)
        prev = best_idx


def mmr_order_triton(gram: torch.Tensor, imp: torch.Tensor, keep: int, mmr_lambda: float, *,
                     block_n: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Greedy MMR pick order (int64 [keep]) from cosine Gram [N, N] fp32 and normalised importance [N] fp32.
    block_n / num_warps override the launch shape (benchmark sweeps)."""
    n = imp.shape[0]
    if gram.shape != (n, n) or gram.dtype != torch.float32 or imp.dtype != torch.float32:
        raise ValueError(f"mmr_order_triton: want gram [N, N] fp32 and imp [N] fp32, got "
                         f"{tuple(gram.shape)} {gram.dtype} and {tuple(imp.shape)} {imp.dtype}")
    if gram.stride(1) != 1:
        gram = gram.contiguous()
    imp = imp.contiguous()
    order = torch.empty(keep, dtype=torch.int64, device=imp.device)
    order[0] = torch.argmax(imp)                 # first pick: most important, lowest index on ties
    max_sim = torch.full((n,), float("-inf"), dtype=torch.float32, device=imp.device)
    if keep > 1:
        block_n = block_n or min(triton.next_power_of_2(n), 4096)
        num_warps = num_warps or (16 if block_n >= 2048 else (8 if block_n >= 512 else 4))
        lam = float(torch.tensor(mmr_lambda, dtype=torch.float32))
        one_minus_lam = float(torch.tensor(1.0 - mmr_lambda, dtype=torch.float32))
        _mmr_greedy_kernel[(1,)](gram, imp, max_sim, order, n, keep, gram.stride(0), lam, one_minus_lam,
                                 BLOCK_N=block_n, num_warps=num_warps)
    return order
