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


# ----------------------------------------------------------------------------------------------------------
# Fused path (N <= FUSED_MAX_TOKENS): no host sync before the work, three launches in all.
#   1. the raw Gram GEMM  G = F F^T  (cuBLAS, fp32 out; launched first so it starts at once);
#   2. _row_stats_kernel: per row, the fp32 L2 norm (= the default importance and the cosine scale) and a
#      non-finite count (the NaN/inf input check, done on the device);
#   3. _mmr_fused_kernel, one program: importance min-max normalisation, first pick, the greedy loop with
#      every per-token state (scaled importance, running max similarity, 1/norm) in registers, and the
#      ascending kept indices. The cosine is formed on the fly as (G[prev, i] * inv[prev]) * inv[i], the
#      same two fp32 products, in the same order, as the old normalised-Gram path (cosine_gram).
# The caller reads one int32 status word (bit 0: features not finite, bit 1: importance not finite) after
# everything is queued, so the check costs no GPU idle time.
# ----------------------------------------------------------------------------------------------------------

FUSED_MAX_TOKENS = 8192
# Launch shape of _mmr_fused_kernel; the benchmark overrides it for its sweep.
FUSED_LAUNCH = {"num_warps": None, "packed": True}


@triton.jit
def _row_stats_kernel(x_ptr, norm_ptr, bad_ptr, D, stride_xm, stride_xd, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_D,), tl.float32)
    nbad = tl.zeros((BLOCK_D,), tl.int32)
    for start in range(0, D, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        x = tl.load(base + offs.to(tl.int64) * stride_xd, mask=offs < D, other=0.0).to(tl.float32)
        acc += x * x
        nbad += ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
    tl.store(norm_ptr + row, tl.sqrt_rn(tl.sum(acc, axis=0)))
    tl.store(bad_ptr + row, tl.max(nbad, axis=0))


@triton.jit
def _argmax_first(score, offs, PACKED: tl.constexpr):
    """Index of the maximum of a 1-D fp32 block, the lowest index on ties (scores are never NaN here)."""
    if PACKED:
        # One int64 max instead of a (value, index) pair reduction: the high word is an order-preserving
        # integer image of the float, the low word 2^31-1-index so that ties go to the lower index.
        s = score + 0.0                                   # -0.0 -> +0.0: equal floats must tie
        b = s.to(tl.int32, bitcast=True)
        k = b ^ ((b >> 31) & 0x7FFFFFFF)
        key = (k.to(tl.int64) << 32) | (0x7FFFFFFF - offs).to(tl.int64)
        best = tl.max(key, axis=0)
        idx = (0x7FFFFFFF - (best & 0xFFFFFFFF)).to(tl.int32)
    else:
        _, idx = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        idx = idx.to(tl.int32)
    return idx


@triton.jit
def _mmr_fused_kernel(
    gram_ptr, norm_ptr, bad_ptr, imp_ptr, order_ptr, sel_ptr, status_ptr,
    N, keep, stride_gm,
    lam, one_minus_lam, eps,
    HAS_IMP: tl.constexpr, PACKED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    norm = tl.load(norm_ptr + offs, mask=mask, other=1.0)
    nbad = tl.load(bad_ptr + offs, mask=mask, other=0)
    if HAS_IMP:
        imp = tl.load(imp_ptr + offs, mask=mask, other=0.0)
    else:
        imp = norm                                       # the default importance: embedding L2 norm
    imp_bad = ((imp != imp) | (tl.abs(imp) == float("inf"))) & mask
    status = (tl.max(nbad, axis=0) > 0).to(tl.int32) | (tl.max(imp_bad.to(tl.int32), axis=0) * 2)

    # normalize_importance(): min-max to [0, 1], a constant vector -> zeros (IEEE division like torch)
    lo = tl.min(tl.where(mask, imp, float("inf")), axis=0)
    hi = tl.max(tl.where(mask, imp, float("-inf")), axis=0)
    span = hi - lo
    pos = span > 0
    ones = tl.full((BLOCK_N,), 1.0, tl.float32)
    impn = tl.where(pos, tl.div_rn(imp - lo, tl.where(pos, span, 1.0) + tl.zeros_like(imp)), 0.0)
    inv = tl.div_rn(ones, tl.maximum(norm, eps))        # 1 / clamp_min(norm, eps)

    prev = _argmax_first(tl.where(mask, impn, float("-inf")), offs, PACKED)
    tl.store(order_ptr, prev.to(tl.int64))
    # A picked (or padding) token gets lam_imp = -inf, hence score -inf for good.
    lam_imp = tl.where(mask, lam * impn, float("-inf"))
    max_sim = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    n_iter = tl.where(status == 0, keep, 1)              # bad input: skip the loop, the caller raises
    for k in range(1, n_iter):
        nrm_prev = tl.load(norm_ptr + prev)
        inv_prev = tl.div_rn(1.0, tl.maximum(nrm_prev, eps))
        g = tl.load(gram_ptr + prev.to(tl.int64) * stride_gm + offs, mask=mask, other=0.0)
        max_sim = tl.maximum(max_sim, (g * inv_prev) * inv)
        lam_imp = tl.where(offs == prev, float("-inf"), lam_imp)
        score = lam_imp - one_minus_lam * max_sim
        prev = _argmax_first(score, offs, PACKED)
        tl.store(order_ptr + k, prev.to(tl.int64))
    lam_imp = tl.where(offs == prev, float("-inf"), lam_imp)
    picked = (lam_imp == float("-inf")) & mask
    slot = tl.cumsum(picked.to(tl.int32), axis=0) - 1
    tl.store(sel_ptr + slot, offs.to(tl.int64), mask=picked)
    tl.store(status_ptr, status)


def raw_gram(features: torch.Tensor) -> torch.Tensor:
    """[N, N] fp32 F F^T (not normalised); bf16/fp16 on CUDA multiply exactly into fp32 accumulators."""
    if features.dtype in (torch.float16, torch.bfloat16) and features.is_cuda:
        try:
            return torch.mm(features, features.T, out_dtype=torch.float32)
        except TypeError:       # torch without mm(out_dtype=): exact but slower fp32 product
            pass
    f32 = features.float()
    return f32 @ f32.T


def mmr_select_fused(features: torch.Tensor, importance: torch.Tensor | None, keep: int, mmr_lambda: float,
                     eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order int64 [keep], kept indices ascending int64 [keep], status int32 [1]) with no host sync.

    importance: raw [N] scores (normalised in the kernel) or None for the embedding norm. status bit 0:
    features contain NaN/inf, bit 1: importance does; then order/kept are not valid."""
    n, d = features.shape
    if n > FUSED_MAX_TOKENS:
        raise ValueError(f"mmr_select_fused: N={n} > FUSED_MAX_TOKENS={FUSED_MAX_TOKENS}")
    if features.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        features = features.float()
    dev = features.device
    gram = raw_gram(features)                            # [N, N] fp32, the big piece: queued first
    norm, bad = row_stats(features)
    if importance is not None:
        importance = importance.detach()
        if importance.dtype != torch.float32:
            importance = importance.float()
        importance = importance.contiguous()
    order = torch.empty(keep, dtype=torch.int64, device=dev)
    sel = torch.empty(keep, dtype=torch.int64, device=dev)
    status = torch.empty(1, dtype=torch.int32, device=dev)
    launch_fused_kernel(gram, norm, bad, importance, order, sel, status, mmr_lambda, eps)
    return order, sel, status


def row_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 L2 norm [N], int32 non-finite flag [N]) of the rows of features [N, D], one launch."""
    n, d = features.shape
    norm = torch.empty(n, dtype=torch.float32, device=features.device)
    bad = torch.empty(n, dtype=torch.int32, device=features.device)
    block_d = min(triton.next_power_of_2(d), 2048)
    _row_stats_kernel[(n,)](features, norm, bad, d, features.stride(0), features.stride(1),
                            BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8)
    return norm, bad


def launch_fused_kernel(gram, norm, bad, importance, order, sel, status, mmr_lambda: float, eps: float) -> None:
    n, keep = norm.shape[0], order.shape[0]
    block_n = triton.next_power_of_2(n)
    num_warps = FUSED_LAUNCH["num_warps"] or (32 if block_n >= 8192 else 16 if block_n >= 4096 else
                                              8 if block_n >= 1024 else 4)
    lam = float(torch.tensor(mmr_lambda, dtype=torch.float32))
    one_minus_lam = float(torch.tensor(1.0 - mmr_lambda, dtype=torch.float32))
    # enable_fp_fusion=False: lam * imp and (1 - lam) * max_sim are rounded before the subtraction, as in
    # the fp32 reference (no FMA).
    _mmr_fused_kernel[(1,)](gram, norm, bad, importance if importance is not None else norm,
                            order, sel, status, n, keep, gram.stride(0), lam, one_minus_lam, eps,
                            HAS_IMP=importance is not None, PACKED=bool(FUSED_LAUNCH["packed"]),
                            BLOCK_N=block_n, num_warps=num_warps, enable_fp_fusion=False)
