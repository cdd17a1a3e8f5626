"""S2O Triton kernel (same semantics as ``s2o_ref``) and the GPU index building.

One program = one (query head, query tile of BLOCK_M rows).  K/V are read from a token-slot pool (page
size 1); the rank array (virtual -> physical position) is composed with ``kv_indices`` on the host into
token SLOTS, so the ranked pass needs one indirection and neither the batch nor the permutation is ever
copied.  The ranking is per TOKEN, so the ranked pass gathers K/V rows (each row is HEAD_DIM contiguous
elements, one 256-byte line in bf16 at d 128: a gather costs the memory transactions of a block load).

Speed (H200, benchmarks/s2o.md): every loop is a ``tl.range`` loop Triton software-pipelines
(num_stages 3).  The early-stop pass runs in chunks of CHUNK blocks: the stop is still decided after
every block, and the blocks of a chunk after the stop are masked out (bit-identical output and visited
count to a check-and-break loop, at the cost of at most CHUNK - 1 wasted block products per (tile, head)).
tau = 0 without a rank skips the ranking and reads the earlier keys in position order (dense attention).
The "planned" rule (v3) builds its rank and budget before the launch (``sampled_mass_triton``: two kernels over
the sampled rows) and runs the tau-0 ranked pass over them; with ``audit`` (v4) the same program then audits the
rest of the segment's ranked blocks by their scores and attends the hits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .s2o_ref import (FP8_KV, MASS_MANTISSA_BITS, NUM_BUCKETS, SAMPLES, check_settings, estimate_scores,
                      rank_from_scores, remaining_ratio, segment_range, tau_per_head, value_means)

LOG2E = 1.4426950408889634
# kernel modes (constexpr MODE)
MODE_EARLY_STOP = 0     # tau > 0: ranked pass with early stop
MODE_RANKED_ALL = 1     # tau = 0 with a rank array (baselines): every one of the n_rank ranked keys
MODE_DENSE = 2          # tau = 0 without a rank: earlier keys in position order (dense attention)
STOP_BLOCK, STOP_REMAINING = 1, 2            # constexpr STOP: s2o_ref's "block" (v1) / "remaining" (v2) rules
AUDIT_STAGES = 5        # the audit score loop's pipelining depth (K tiles only; H200: 5 beats 3 by 10%)
AUDIT_HEADS = 2         # the split audit: q heads of one KV group per program (they share each gathered K tile)
AUDIT_N = 64            # the split audit: keys per score product (a rank block is scored in BLOCK_N / AUDIT_N parts)
AUDIT_WARPS = 8         # the split audit: warps per program (its rows are HEADS x BLOCK_M)
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# the fp8 audit's margin in standard deviations of its rounding error (``fp8_audit_operands``); the largest error
# seen on the generator and the trained model's activations was 2.6 of them (benchmarks/s2o.md)
AUDIT_FP8_SIGMAS = 4.0


@triton.jit
def _attend_block(q, k, v, m_i, l_i, acc, qk_mask, qk_scale, IEEE: tl.constexpr, MASKED: tl.constexpr = True):
    # k: [HEAD_DIM, BLOCK_N] gathered columns, v: [BLOCK_N, HEAD_DIM] gathered rows; an fp8 cache's K/V are
    # widened to q's dtype here (exact: every e4m3 / e5m2 value is a bf16 / fp16 value), their scales are folded
    # into qk_scale and the final output.  MASKED = False: every (row, key) of the block counts (qk_mask is
    # ignored), which saves a select per score; the scale is applied inside the exponent's fused multiply-add
    # (qk_scale > 0, so max(qk) * qk_scale = max(qk * qk_scale))
    qk = _scores(q, k, IEEE)
    if MASKED:
        qk = tl.where(qk_mask, qk, float("-inf"))
    return _softmax_update(qk, v.to(q.dtype), m_i, l_i, acc, qk_scale, IEEE)


@triton.jit
def _to_fp16(q, qk_scale):
    # q (bf16) as fp16 for the products with an fp8 cache's K/V: e4m3 and e5m2 widen to fp16 with one conversion
    # per pair of values (to bf16 they take several), and fp16 holds every value of both exactly.  A tile whose
    # largest |q| exceeds 2^14 is first scaled by a power of two 2^-e (exact), with 2^e moved into qk_scale, so no
    # product or element overflows fp16's range; below it q only gains mantissa bits (10 against bf16's 7)
    big = tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0)
    e = tl.maximum(tl.ceil(tl.math.log2(big * (1.0 / 16384.0))), 0.0)
    return (q.to(tl.float32) * tl.math.exp2(-e)).to(tl.float16), qk_scale * tl.math.exp2(e)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _scores(q, k, IEEE: tl.constexpr):
    k = k.to(q.dtype)
    if IEEE:
        return tl.dot(q, k, input_precision="ieee")
    return tl.dot(q, k)


@triton.jit
def _softmax_update(qk, v, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
    # one block's raw scores qk [BLOCK_M, BLOCK_N] and values v into the online softmax state (log2 units)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    block_mass = tl.sum(p, 1)
    prev_mass = l_i * alpha
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, prev_mass + block_mass, acc, block_mass, prev_mass


@triton.jit
def _kv_block(K, V, slot, ok, hk, stride_kt, stride_kh, stride_vt, stride_vh, offs_d, MASKED: tl.constexpr = True):
    # gathered K columns [HEAD_DIM, BLOCK_N] and V rows [BLOCK_N, HEAD_DIM]; each row is HEAD_DIM contiguous
    # elements (one 128/256-byte line), so a row gather costs the same memory transactions as a block load.
    # K is gathered as rows like V and transposed on chip (H200: the paged dense path 8-10% faster than gathering
    # it as columns, the sparse paths 1-3%, outputs bit-identical; benchmarks/s2o.md).
    # MASKED = False: every slot is valid (ok is ignored)
    k_ptr = K + slot[:, None] * stride_kt + hk * stride_kh + offs_d[None, :]
    v_ptr = V + slot[:, None] * stride_vt + hk * stride_vh + offs_d[None, :]
    if MASKED:
        return tl.trans(tl.load(k_ptr, mask=ok[:, None], other=0.0)), tl.load(v_ptr, mask=ok[:, None], other=0.0)
    return tl.trans(tl.load(k_ptr)), tl.load(v_ptr)


@triton.jit
def _tile_of(TILE_SEQ, TILE_START, TILE_ROW, QO_INDPTR, KV_INDPTR, tile):
    # a program's query tile (the plan's tables): its first position t0 and rank row, and its sequence's first q
    # row, kv offset, kv length L and prefix (the cached keys before its queries)
    b = tl.load(TILE_SEQ + tile)
    t0 = tl.load(TILE_START + tile)   # absolute position of the tile's first row
    row = tl.load(TILE_ROW + tile)    # (sequence, segment) row of the rank array
    q_beg = tl.load(QO_INDPTR + b)
    kv_beg = tl.load(KV_INDPTR + b)
    L = tl.load(KV_INDPTR + b + 1) - kv_beg
    return t0, row, q_beg, kv_beg, L, L - (tl.load(QO_INDPTR + b + 1) - q_beg)


@triton.jit
def _s2o_fwd(Q, K, V, O, LSE, VISITED,
             KV_IDX, QO_INDPTR, KV_INDPTR, TILE_SEQ, TILE_START, TILE_ROW, RANK, RANK_LEN, TAU, RATIO, VBAR, HITS,
             Q8, QS, MARG, K8, K8S, qk_scale, v_scale, forced, stride_hits, stride_q8t, stride_q8h, stride_qst,
             stride_k8t, stride_k8h,
             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
             stride_lt, stride_lh, stride_rr, stride_rh, stride_nr, stride_xr, stride_xh, stride_br, stride_bh,
             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             SEGMENT: tl.constexpr, HAS_RANK_LEN: tl.constexpr, RETURN_LSE: tl.constexpr,
             IEEE: tl.constexpr, KV_CONTIG: tl.constexpr, MODE: tl.constexpr, CHUNK: tl.constexpr,
             STAGES: tl.constexpr, STOP: tl.constexpr, HAS_RATIO: tl.constexpr, COMPENSATE: tl.constexpr,
             AUDIT: tl.constexpr = False, AUDIT_STAGES: tl.constexpr = 5, AUDIT_FP8: tl.constexpr = False,
             AUDIT_LAST: tl.constexpr = 0, Q_FP16: tl.constexpr = False, LSE_LOG2: tl.constexpr = False):
    """MODE_EARLY_STOP: ranked pass with early stop (tau > 0), checked after every block, run in chunks of
    CHUNK blocks whose inner loop is software-pipelined (blocks after the stop inside a chunk are masked out,
    so the result and the visited count are exactly those of a check-and-break loop).  STOP picks the rule
    (s2o_ref's module doc); the first ``forced`` ranked blocks are never stopped in (the local window);
    RATIO (HAS_RATIO) holds R[b], else R[b] = blocks left; COMPENSATE keeps the predicted unvisited mass
    with the value mean VBAR.  TAU: one threshold per KV head.
    MODE_RANKED_ALL: tau = 0 with a rank array: all ``n_rank`` ranked keys, one pipelined loop; with AUDIT (the
    planned rule's v4) then the audit of the segment's other ranked blocks against TAU (s2o_ref), its hits
    listed in HITS (one row per program) and attended in rank order; AUDIT_LAST > 0 (v5): only the tiles holding
    one of the sequence's last AUDIT_LAST positions audit (the others audit no block).  AUDIT_FP8: the audit's
    scores come from fp8 copies of q and K (Q8 x QS, K8 x K8S) on fp8 tensor cores; a block whose approximate
    score comes within the row's margin MARG of the threshold is listed, and the listed blocks are tested again on
    the exact scores before they count (``fp8_audit_operands``): the visited blocks are the exact audit's as long
    as no fp8 rounding error exceeds its margin.
    MODE_DENSE: tau = 0 without a rank: the earlier keys in position order (dense attention).
    RANK holds token SLOTS (the rank composed with kv_indices on the host); KV_CONTIG: slot = kv_beg + pos.
    An fp8 K/V cache: qk_scale carries k_scale, v_scale multiplies the output (1.0 otherwise); VBAR is then
    in the cache's units, like acc.  Q_FP16 (an fp8 cache with bf16 q): the products run in fp16 (``_to_fp16``)."""
    h = tl.program_id(0)              # query head (fastest: the heads of one tile share K/V in L2)
    tile = tl.program_id(1)
    n_heads = tl.num_programs(0)
    hk = h // GROUP
    t0, row, q_beg, kv_beg, L, prefix = _tile_of(TILE_SEQ, TILE_START, TILE_ROW, QO_INDPTR, KV_INDPTR, tile)

    offs_m = t0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_b = tl.arange(0, BLOCK_N)
    row_ok = (offs_m >= prefix) & (offs_m < L)
    q_rows = q_beg + offs_m - prefix
    # q stays on chip for both passes
    q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    qk_scale_in = qk_scale            # for the fp8 audit, whose q8 stands for q as loaded
    if Q_FP16:
        q, qk_scale = _to_fp16(q, qk_scale)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    seg_start = (t0 // SEGMENT) * SEGMENT
    last = tl.minimum(t0 + BLOCK_M, L)  # exclusive
    # 1. intra-segment pass: dense causal over keys [seg_start, last); the blocks wholly before the tile's first
    # row are unmasked
    full_end = seg_start + (t0 - seg_start) // BLOCK_N * BLOCK_N
    for start_n in tl.range(seg_start, full_end, BLOCK_N, num_stages=STAGES):
        offs_n = start_n + offs_b
        if KV_CONTIG:
            slot = (kv_beg + offs_n).to(tl.int64)
        else:
            slot = tl.load(KV_IDX + kv_beg + offs_n).to(tl.int64)
        k, v = _kv_block(K, V, slot, None, hk, stride_kt, stride_kh, stride_vt, stride_vh, offs_d, False)
        m_i, l_i, acc, _bm, _pm = _attend_block(q, k, v, m_i, l_i, acc, None, qk_scale, IEEE, False)
    for start_n in tl.range(full_end, last, BLOCK_N, num_stages=STAGES):
        offs_n = start_n + offs_b
        n_ok = offs_n < last
        slot = _slot_of(KV_IDX, kv_beg, offs_n, n_ok, True, KV_CONTIG).to(tl.int64)
        k, v = _kv_block(K, V, slot, n_ok, hk, stride_kt, stride_kh, stride_vt, stride_vh, offs_d)
        mask = (offs_m[:, None] >= offs_n[None, :]) & n_ok[None, :]
        m_i, l_i, acc, _bm, _pm = _attend_block(q, k, v, m_i, l_i, acc, mask, qk_scale, IEEE)

    # 2. ranked pass over the earlier keys
    if HAS_RANK_LEN:
        n_rank = tl.load(RANK_LEN + row * stride_nr + hk)
    else:
        n_rank = seg_start
    n_blk = (n_rank + BLOCK_N - 1) // BLOCK_N
    rank_ptr = RANK + row.to(tl.int64) * stride_rr + hk * stride_rh
    # virtual position -> slot: the rank row (MODE 0, 1) or kv_indices in position order (MODE 2)
    if MODE == 2:
        idx_ptr = KV_IDX + kv_beg
    else:
        idx_ptr = rank_ptr
    rem = tl.zeros([BLOCK_M], tl.float32)     # predicted unvisited mass at the stop (STOP_REMAINING)
    if MODE != 0:
        # whole blocks unmasked, then the partial last block (a rank_len that is not a multiple of BLOCK_N).
        # Slots loaded in the iteration: loading them two blocks ahead (loop-carried) measured 20-22% slower
        # at 128K (benchmarks/s2o_planned.py), as it did for the early-stop loop below
        n_full = n_rank // BLOCK_N
        for j in tl.range(0, n_full, num_stages=STAGES):
            offs_n = j * BLOCK_N + offs_b
            if MODE == 2 and KV_CONTIG:
                slot = (kv_beg + offs_n).to(tl.int64)
            else:
                slot = tl.load(idx_ptr + offs_n).to(tl.int64)
            k, v = _kv_block(K, V, slot, None, hk, stride_kt, stride_kh, stride_vt, stride_vh, offs_d, False)
            m_i, l_i, acc, _bm, _pm = _attend_block(q, k, v, m_i, l_i, acc, None, qk_scale, IEEE, False)
        if n_full < n_blk:
            offs_n = n_full * BLOCK_N + offs_b
            c_ok = offs_n < n_rank
            if MODE == 2 and KV_CONTIG:
                slot = (kv_beg + offs_n).to(tl.int64)
            else:
                slot = tl.load(idx_ptr + offs_n, mask=c_ok, other=0).to(tl.int64)
            k, v = _kv_block(K, V, slot, c_ok, hk, stride_kt, stride_kh, stride_vt, stride_vh, offs_d)
            m_i, l_i, acc, _bm, _pm = _attend_block(q, k, v, m_i, l_i, acc, c_ok[None, :], qk_scale, IEEE)
        n_vis = n_blk
        if AUDIT:
            # the remaining ranked blocks of the segment (seg_start is a multiple of BLOCK_N), scores only: a block
            # is a hit if a key there holds > tau of some row's mass after the plan (s2o_ref, "audit").  One
            # branch-free pass writes the hits' block numbers to this program's row of HITS, a second attends them
            thr = tl.where(row_ok, m_i + tl.math.log2(l_i) + tl.math.log2(tl.load(TAU + hk)), float("inf"))
            hits_ptr = HITS + (tile * n_heads + h).to(tl.int64) * stride_hits
            n_hit = n_blk * 0
            n_all = seg_start // BLOCK_N
            if AUDIT_LAST > 0:
                n_all = tl.where(last > L - AUDIT_LAST, n_all, n_blk)
            if AUDIT_FP8:
                # one fp8 row of q per query row, its scale with K8's and the softmax scale folded in (log2 units),
                # and the threshold lowered by the row's rounding margin
                q8 = tl.load(Q8 + q_rows[:, None] * stride_q8t + h * stride_q8h + offs_d[None, :],
                             mask=row_ok[:, None], other=0.0)
                qs = tl.load(QS + q_rows * stride_qst + h, mask=row_ok, other=0.0) * tl.load(K8S + hk) * qk_scale_in
                thr8 = thr - tl.load(MARG + q_rows * stride_qst + h, mask=row_ok, other=0.0) * qk_scale_in
            # 32 blocks at a time: each row keeps its own hit bits (no exchange between warps inside the loop),
            # then one OR over the rows gives the 32 verdicts, appended to the hit list without a branch
            for w0 in range(n_blk, n_all, 32):
                bits = tl.zeros([BLOCK_M], tl.int32)
                for j in tl.range(w0, tl.minimum(w0 + 32, n_all), num_stages=AUDIT_STAGES):
                    slot = tl.load(idx_ptr + j * BLOCK_N + offs_b).to(tl.int64)
                    if AUDIT_FP8:
                        k8 = tl.load(K8 + slot[None, :] * stride_k8t + hk * stride_k8h + offs_d[:, None])
                        hit = tl.max(tl.dot(q8, k8), 1) * qs > thr8
                    else:
                        qk = _scores(q, tl.load(K + slot[None, :] * stride_kt + hk * stride_kh + offs_d[:, None]),
                                     IEEE)
                        hit = tl.max(qk, 1) * qk_scale > thr
                    bits = bits | (hit.to(tl.int32) << (j - w0))
                word = tl.reduce(bits, 0, _bit_or)
                for i in tl.static_range(32):
                    bit = (word >> i) & 1
                    tl.store(hits_ptr + n_hit, w0 + i, mask=bit == 1)
                    n_hit += bit
            if AUDIT_FP8:
                # the listed blocks tested again on their exact scores, 32 at a time as above; the hits are kept in
                # place (a hit is written at or before the entry it was read from, after that entry was read)
                n_list = n_hit
                n_hit = n_blk * 0
                for w0 in range(0, n_list, 32):
                    bits = tl.zeros([BLOCK_M], tl.int32)
                    for t in tl.range(w0, tl.minimum(w0 + 32, n_list), num_stages=AUDIT_STAGES):
                        slot = tl.load(idx_ptr + tl.load(hits_ptr + t) * BLOCK_N + offs_b).to(tl.int64)
                        qk = _scores(q, tl.load(K + slot[None, :] * stride_kt + hk * stride_kh + offs_d[:, None]),
                                     IEEE)
                        bits = bits | ((tl.max(qk, 1) * qk_scale > thr).to(tl.int32) << (t - w0))
                    word = tl.reduce(bits, 0, _bit_or)
                    for i in tl.static_range(32):
                        bit = (word >> i) & 1
                        listed = tl.load(hits_ptr + w0 + i, mask=w0 + i < n_list, other=0)
                        tl.store(hits_ptr + n_hit, listed, mask=bit == 1)
                        n_hit += bit
            for t in tl.range(0, n_hit, num_stages=STAGES):
                slot = tl.load(idx_ptr + tl.load(hits_ptr + t) * BLOCK_N + offs_b).to(tl.int64)
                k, v = _kv_block(K, V, slot, None, hk, stride_kt, stride_kh, stride_vt, stride_vh, offs_d, False)
                m_i, l_i, acc, _bm, _pm = _attend_block(q, k, v, m_i, l_i, acc, None, qk_scale, IEEE, False)
            n_vis += n_hit
    else:
        n_vis = n_blk * 0
        go = n_blk > 0
        blk = n_blk * 0
        tau = tl.load(TAU + hk)
        ratio_ptr = RATIO + row.to(tl.int64) * stride_xr + hk * stride_xh
        # (loading the slots two blocks ahead measured slower here too: 457 vs 377 ms at 128K)
        while go:
            for j in tl.range(blk, tl.minimum(blk + CHUNK, n_blk), num_stages=STAGES):
                offs_n = j * BLOCK_N + offs_b
                c_ok = offs_n < n_rank
                slot = tl.load(idx_ptr + offs_n, mask=c_ok, other=0).to(tl.int64)
                k, v = _kv_block(K, V, slot, c_ok, hk, stride_kt, stride_kh, stride_vt, stride_vh, offs_d)
                # after the stop (go false) the block is fully masked: m, l, acc stay unchanged
                m_i, l_i, acc, block_mass, prev_mass = _attend_block(q, k, v, m_i, l_i, acc,
                                                                     (c_ok & go)[None, :], qk_scale, IEEE)
                n_vis += go.to(tl.int32)
                if STOP == 1:
                    small = block_mass < tau * prev_mass
                else:
                    if HAS_RATIO:
                        left = tl.load(ratio_ptr + j)
                    else:
                        left = (n_blk - 1 - j).to(tl.float32)
                    tail = block_mass * left
                    small = tail < tau * (prev_mass + block_mass)
                small = small | (row_ok == 0)
                stop_now = go & (tl.min(small.to(tl.int32), 0) == 1) & (j >= forced)
                if COMPENSATE:
                    rem = tl.where(stop_now, tail, rem)
                go = go & (j + 1 < n_blk) & (stop_now == 0)
            blk += CHUNK
        if COMPENSATE:
            vbar = tl.load(VBAR + row.to(tl.int64) * stride_br + hk * stride_bh + offs_d)
            acc += rem[:, None] * vbar[None, :]
            l_i += rem

    out = acc / l_i[:, None] * v_scale
    tl.store(O + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    if RETURN_LSE:
        lse = m_i + tl.math.log2(l_i)
        if not LSE_LOG2:
            lse = lse * 0.6931471805599453
        tl.store(LSE + q_rows * stride_lt + h * stride_lh, lse, mask=row_ok)
    tl.store(VISITED + tile * n_heads + h, n_vis)


@triton.jit
def _s2o_audit(Q, K, LSE2, TAU, RANK, RANK_LEN, HITS, N_HIT, QO_INDPTR, KV_INDPTR, TILE_SEQ, TILE_START, TILE_ROW,
               qk_scale, stride_hits, stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh, stride_rr,
               stride_rh, stride_nr,
               GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, AUDIT_N: tl.constexpr, SEGMENT: tl.constexpr, AUDIT_LAST: tl.constexpr,
               STAGES: tl.constexpr, IEEE: tl.constexpr, Q_FP16: tl.constexpr):
    """The split audit (v4): the same verdicts as ``_s2o_fwd``'s AUDIT pass, as a kernel of its own between the
    planned pass (which wrote each row's log2 log-sum-exp to LSE2) and ``_s2o_hits``.  One program = one query
    tile x HEADS query heads of one KV group: its HEADS x BLOCK_M rows share every gathered K tile, so the audit
    gathers K once per HEADS heads, and without an accumulator or V tiles on chip it holds the rows and a deeper
    pipeline.  Each BLOCK_N-key block of the rank is scored AUDIT_N keys at a time (a block is a hit iff one of
    its parts is); the hits' block numbers go to HITS (one row per (tile, q head)), their count to N_HIT."""
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    n_heads = tl.num_programs(0) * HEADS
    hk = pid // (GROUP // HEADS)
    h0 = hk * GROUP + (pid % (GROUP // HEADS)) * HEADS
    t0, row, q_beg, _kv_beg, L, prefix = _tile_of(TILE_SEQ, TILE_START, TILE_ROW, QO_INDPTR, KV_INDPTR, tile)
    # rows r = (head h0 + r // BLOCK_M, position t0 + r % BLOCK_M)
    offs_r = tl.arange(0, HEADS * BLOCK_M)
    pos = t0 + offs_r % BLOCK_M
    head = h0 + offs_r // BLOCK_M
    offs_d = tl.arange(0, HEAD_DIM)
    offs_a = tl.arange(0, AUDIT_N)
    row_ok = (pos >= prefix) & (pos < L)
    q_rows = q_beg + pos - prefix
    q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    if Q_FP16:
        q, qk_scale = _to_fp16(q, qk_scale)
    lse2 = tl.load(LSE2 + q_rows * stride_lt + head * stride_lh, mask=row_ok, other=0.0)
    thr = tl.where(row_ok, lse2 + tl.math.log2(tl.load(TAU + hk)), float("inf"))
    seg_start = (t0 // SEGMENT) * SEGMENT
    last = tl.minimum(t0 + BLOCK_M, L)
    n_blk = (tl.load(RANK_LEN + row * stride_nr + hk) + BLOCK_N - 1) // BLOCK_N
    n_all = seg_start // BLOCK_N
    if AUDIT_LAST > 0:
        n_all = tl.where(last > L - AUDIT_LAST, n_all, n_blk)
    idx_ptr = RANK + row.to(tl.int64) * stride_rr + hk * stride_rh
    hits_ptr = HITS + (tile * n_heads + h0 + tl.arange(0, HEADS)).to(tl.int64) * stride_hits     # [HEADS]
    n_hit = tl.zeros([HEADS], tl.int32)
    for w0 in range(n_blk, n_all, 32):
        bits = tl.zeros([HEADS * BLOCK_M], tl.int32)
        for j in tl.range(w0, tl.minimum(w0 + 32, n_all), num_stages=STAGES):
            for part in tl.static_range(BLOCK_N // AUDIT_N):
                slot = tl.load(idx_ptr + j * BLOCK_N + part * AUDIT_N + offs_a).to(tl.int64)
                k = tl.load(K + slot[:, None] * stride_kt + hk * stride_kh + offs_d[None, :])
                hit = tl.max(_scores(q, tl.trans(k), IEEE), 1) * qk_scale > thr
                bits = bits | (hit.to(tl.int32) << (j - w0))
        words = tl.reduce(tl.reshape(bits, [HEADS, BLOCK_M]), 1, _bit_or)          # [HEADS]
        for i in tl.static_range(32):
            bit = (words >> i) & 1
            tl.store(hits_ptr + n_hit, w0 + i, mask=bit == 1)
            n_hit += bit
    tl.store(N_HIT + tile * n_heads + h0 + tl.arange(0, HEADS), n_hit)


@triton.jit
def _s2o_hits(Q, K, V, O32, LSE2, O, LSE, RANK, HITS, N_HIT, QO_INDPTR, KV_INDPTR, TILE_SEQ, TILE_START, TILE_ROW,
              qk_scale, v_scale, stride_hits, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
              stride_xt, stride_xh, stride_ot, stride_oh, stride_lt, stride_lh, stride_rr, stride_rh,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              RETURN_LSE: tl.constexpr, STAGES: tl.constexpr, IEEE: tl.constexpr, Q_FP16: tl.constexpr):
    """The split audit's last step: a tile's normalised planned output O32 and its log2 log-sum-exp LSE2 are the
    online-softmax state (m, l, acc) = (LSE2, 1, O32); the audit's hits join it as in ``_s2o_fwd`` and the output
    (x v_scale) is written in O's dtype.  A tile without hits is O32 x v_scale, as ``_s2o_fwd`` computes it."""
    h = tl.program_id(0)
    tile = tl.program_id(1)
    n_heads = tl.num_programs(0)
    hk = h // GROUP
    t0, row, q_beg, _kv_beg, L, prefix = _tile_of(TILE_SEQ, TILE_START, TILE_ROW, QO_INDPTR, KV_INDPTR, tile)
    offs_m = t0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_b = tl.arange(0, BLOCK_N)
    row_ok = (offs_m >= prefix) & (offs_m < L)
    q_rows = q_beg + offs_m - prefix
    acc = tl.load(O32 + q_rows[:, None] * stride_xt + h * stride_xh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.load(LSE2 + q_rows * stride_lt + h * stride_lh, mask=row_ok, other=0.0)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    n_hit = tl.load(N_HIT + tile * n_heads + h)
    if n_hit > 0:
        q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)
        if Q_FP16:
            q, qk_scale = _to_fp16(q, qk_scale)
        idx_ptr = RANK + row.to(tl.int64) * stride_rr + hk * stride_rh
        hits_ptr = HITS + (tile * n_heads + h).to(tl.int64) * stride_hits
        for t in tl.range(0, n_hit, num_stages=STAGES):
            slot = tl.load(idx_ptr + tl.load(hits_ptr + t) * BLOCK_N + offs_b).to(tl.int64)
            k, v = _kv_block(K, V, slot, None, hk, stride_kt, stride_kh, stride_vt, stride_vh, offs_d, False)
            m_i, l_i, acc, _bm, _pm = _attend_block(q, k, v, m_i, l_i, acc, None, qk_scale, IEEE, False)
    out = acc / l_i[:, None] * v_scale
    tl.store(O + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    if RETURN_LSE:
        tl.store(LSE + q_rows * stride_lt + h * stride_lh, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
                 mask=row_ok)


SAMPLE_ROWS = 128        # sampled (row, q head) pairs per program of the mass estimate (padded)
MASS_BLOCKS = 16         # key blocks per program of ``_sampled_mass``
LSE_PROGRAMS = 256       # the sampled rows' log-sum-exp is split over keys until about this many programs run
LSE_MIN_KEYS = 1024      # (but no split holds fewer keys than this)
INDEX_BLOCK = 1024       # entries per step of the ranking kernels


@triton.jit
def _sample_pairs(seg, c0, prefix, L, first_seg, offs_r, N_SAMPLE: tl.constexpr, GROUP: tl.constexpr,
                  SEGMENT: tl.constexpr):
    """The chunk's sampled (row, q head) pairs c = c0 + r, q head major (c = g * N_SAMPLE + i, as in
    ``s2o_ref.sampled_mass``): each row's position (``s2o_ref.sampled_rows``: integer arithmetic, the same rows),
    its q head in the group, whether it is a real pair (padding pairs: position 0, q = 0), the segment start."""
    c = c0 + offs_r
    ok = c < N_SAMPLE * GROUP
    i = c % N_SAMPLE
    st = (first_seg + seg) * SEGMENT
    lo = tl.maximum(st, prefix)
    hi = tl.minimum(st + SEGMENT, L)
    pos = tl.where(ok, lo + ((2 * i + 1) * (hi - lo)) // (2 * N_SAMPLE), 0)
    return pos, tl.where(ok, c // N_SAMPLE, 0), ok, st


@triton.jit
def _sampled_q(Q, pos, g, ok, prefix, hk, stride_qt, stride_qh, offs_d, GROUP: tl.constexpr):
    # the sampled rows of q, read in place ([ROWS, HEAD_DIM]; padding rows 0)
    ptr = Q + (pos - prefix)[:, None].to(tl.int64) * stride_qt + (hk * GROUP + g)[:, None] * stride_qh
    return tl.load(ptr + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _slot_of(KV_IDX, kv_beg, pos, ok, SLOTS: tl.constexpr, KV_CONTIG: tl.constexpr):
    # key position pos -> its token slot (through kv_indices unless KV_CONTIG); SLOTS false: the position itself
    # (one return: Triton types every return statement, even one after a constexpr branch has returned, and
    # KV_IDX is a stand-in of another dtype where it is not read)
    if not SLOTS:
        slot = pos
    elif KV_CONTIG:
        slot = kv_beg + pos
    else:
        slot = tl.load(KV_IDX + kv_beg + pos, mask=ok, other=0)
    return slot


@triton.jit
def _key_cols(K, KV_IDX, kv_beg, offs_n, n_ok, hk, stride_kt, stride_kh, offs_d, KV_CONTIG: tl.constexpr):
    # keys offs_n of the sequence as columns [HEAD_DIM, BLOCK_N] (through kv_indices unless KV_CONTIG)
    slot = _slot_of(KV_IDX, kv_beg, offs_n, n_ok, True, KV_CONTIG).to(tl.int64)
    return tl.load(K + slot[None, :] * stride_kt + hk * stride_kh + offs_d[:, None], mask=n_ok[None, :], other=0.0)


@triton.jit
def _sampled_lse(Q, K, KV_IDX, M_OUT, L_OUT, kv_beg, prefix, L, first_seg, c0, split_keys, qk_scale,
                 stride_qt, stride_qh, stride_kt, stride_kh, N_SAMPLE: tl.constexpr, GROUP: tl.constexpr,
                 SEGMENT: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 IEEE: tl.constexpr, KV_CONTIG: tl.constexpr):
    """Partial log2-sum-exp of the chunk's sampled rows of segment ``program_id(0)``, KV head ``program_id(1)``,
    over the keys of split ``program_id(2)`` ([split * split_keys, +split_keys) and causal for the row): the
    running maximum and sum (log2 units, logits scaled by qk_scale), combined by ``_sampled_mass``."""
    seg = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_b = tl.arange(0, BLOCK_N)
    pos, g, ok, st = _sample_pairs(seg, c0, prefix, L, first_seg, offs_r, N_SAMPLE, GROUP, SEGMENT)
    q = _sampled_q(Q, pos, g, ok, prefix, hk, stride_qt, stride_qh, offs_d, GROUP)
    lo = split * split_keys
    end = tl.minimum(tl.max(pos, 0) + 1, lo + split_keys)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    for start in tl.range(lo, end, BLOCK_N, num_stages=2):
        offs_n = start + offs_b
        k = _key_cols(K, KV_IDX, kv_beg, offs_n, offs_n < end, hk, stride_kt, stride_kh, offs_d, KV_CONTIG)
        qk = _scores(q, k, IEEE)
        qk = tl.where(offs_n[None, :] <= pos[:, None], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)     # a row with no causal key in this split yet
        l = l * tl.math.exp2(m - m_use) + tl.sum(tl.math.exp2(qk - m_use[:, None]), 1)
        m = m_new
    out = ((seg * tl.num_programs(1) + hk) * tl.num_programs(2) + split) * ROWS + offs_r
    tl.store(M_OUT + out, m)
    tl.store(L_OUT + out, l)


@triton.jit
def _sampled_mass(Q, K, KV_IDX, M_IN, L_IN, E, kv_beg, prefix, L, first_seg, c0, n_split, weight, qk_scale,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_es, stride_eh, N_SAMPLE: tl.constexpr,
                  GROUP: tl.constexpr, SEGMENT: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, IEEE: tl.constexpr, KV_CONTIG: tl.constexpr,
                  MAX: tl.constexpr, ACCUMULATE: tl.constexpr):
    """E[seg, hk, j] (+)= sum_r weight * p_rj (MAX: max_r over the real pairs) for the earlier keys j < seg_start
    of BLOCKS key blocks, p_rj = 2^(qk_scale * q_r . k_j - lse_r) the sampled row's exact softmax, lse_r
    combined from ``_sampled_lse``'s n_split partials.  ACCUMULATE: add to E (a later chunk of pairs)."""
    hk = tl.program_id(1)
    seg = tl.program_id(2)
    offs_r = tl.arange(0, ROWS)
    pos, g, ok, st = _sample_pairs(seg, c0, prefix, L, first_seg, offs_r, N_SAMPLE, GROUP, SEGMENT)
    first = tl.program_id(0) * BLOCKS * BLOCK_N
    if first < st:
        offs_d = tl.arange(0, HEAD_DIM)
        offs_b = tl.arange(0, BLOCK_N)
        q = _sampled_q(Q, pos, g, ok, prefix, hk, stride_qt, stride_qh, offs_d, GROUP)
        part = (seg * tl.num_programs(1) + hk) * n_split * ROWS + offs_r
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        for sp in range(0, n_split):
            ms = tl.load(M_IN + part + sp * ROWS)
            m_new = tl.maximum(m, ms)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.math.exp2(m - m_use) + tl.load(L_IN + part + sp * ROWS) * tl.math.exp2(ms - m_use)
            m = m_new
        lse = m + tl.math.log2(l)                 # finite: key 0 is causal for every row
        w = tl.where(ok, weight, 0.0)
        e_ptr = E + seg.to(tl.int64) * stride_es + hk * stride_eh
        for j in tl.range(0, BLOCKS, num_stages=2):
            offs_n = first + j * BLOCK_N + offs_b
            n_ok = offs_n < st
            k = _key_cols(K, KV_IDX, kv_beg, offs_n, n_ok, hk, stride_kt, stride_kh, offs_d, KV_CONTIG)
            p = tl.math.exp2(_scores(q, k, IEEE) * qk_scale - lse[:, None])
            if MAX:
                e = tl.max(tl.where(w[:, None] > 0, p, 0.0), 0)
            else:
                e = tl.sum(p * w[:, None], 0)
            if ACCUMULATE:
                e_old = tl.load(e_ptr + offs_n, mask=n_ok, other=0.0)
                e = tl.maximum(e_old, e) if MAX else e_old + e
            tl.store(e_ptr + offs_n, e, mask=n_ok)


def sampled_mass_triton(q: torch.Tensor, k_pool: torch.Tensor, *, segment_size: int, sm_scale: float,
                        n_sample: int = SAMPLES, reduce: str = "mean", kv_indices: torch.Tensor | None = None,
                        kv_beg: int = 0, kv_len: int | None = None, k_scale: float = 1.0) -> torch.Tensor:
    """``s2o_ref.sampled_mass`` on the GPU (same rows, same definition): fp32 [n_seg, Hkv, L].  q [Tq, Hq, D] is
    the sequence's last Tq positions; its L keys are k_pool's slots kv_indices[kv_beg:kv_beg + L] (or rows
    kv_beg.. of k_pool when kv_indices is None), read in place (an fp8 pool through k_scale).  Two kernels per
    chunk of SAMPLE_ROWS (row, q head) pairs: each row's log-sum-exp over its causal keys (split over keys when
    the segments alone give few programs), then the rows' weighted probabilities of every earlier key.  No host
    synchronisation (the sizes are host ints)."""
    Tq, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    L = kv_len if kv_len is not None else k_pool.shape[0] - kv_beg
    G = Hq // Hkv
    prefix = L - Tq
    segs = segment_range(L, Tq, segment_size)
    n_seg = len(segs)
    dev = q.device
    e = torch.zeros(n_seg, Hkv, L, dtype=torch.float32, device=dev)
    max_start = (segs.stop - 1) * segment_size
    if n_seg == 0 or max_start == 0:
        return e
    block_n = 64
    n_split = max(1, min(-(-LSE_PROGRAMS // (n_seg * Hkv)), L // LSE_MIN_KEYS))
    split_keys = -(-L // (n_split * block_n)) * block_n
    n_split = -(-L // split_keys)
    contig = kv_indices is None
    idx = k_pool if contig else kv_indices                     # (not read when contiguous)
    qk_scale = sm_scale * LOG2E * k_scale
    ieee = q.dtype == torch.float32
    common = dict(N_SAMPLE=n_sample, GROUP=G, SEGMENT=segment_size, ROWS=SAMPLE_ROWS, HEAD_DIM=D, BLOCK_N=block_n,
                  IEEE=ieee, KV_CONTIG=contig, num_warps=8)
    m_part = torch.empty(n_seg, Hkv, n_split, SAMPLE_ROWS, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    for c0 in range(0, G * n_sample, SAMPLE_ROWS):
        _sampled_lse[(n_seg, Hkv, n_split)](q, k_pool, idx, m_part, l_part, kv_beg, prefix, L, segs.start, c0,
                                            split_keys, qk_scale, q.stride(0), q.stride(1), k_pool.stride(0),
                                            k_pool.stride(1), **common)
        grid = (triton.cdiv(max_start, MASS_BLOCKS * block_n), Hkv, n_seg)
        _sampled_mass[grid](q, k_pool, idx, m_part, l_part, e, kv_beg, prefix, L, segs.start, c0, n_split,
                            1.0 / (G * n_sample), qk_scale, q.stride(0), q.stride(1), k_pool.stride(0),
                            k_pool.stride(1), e.stride(0), e.stride(1), BLOCKS=MASS_BLOCKS, MAX=reduce == "max",
                            ACCUMULATE=c0 > 0, **common)
    return e


@triton.jit
def _mass_keys(E_BITS, KEYS, L, first_seg, n_kv_heads, WINDOW, SEGMENT: tl.constexpr, NB: tl.constexpr,
               SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """Sort keys of rank row ``program_id(0)`` (= segment x n_kv_heads + KV head) of the estimate e [rows, L]
    (read as its fp32 bits): row * NB + bucket, bucket = (octaves of the row's largest e) - (octaves of e_j)
    clamped to NB - 2 (``s2o_ref.rank_by_mass``), 0 for the WINDOW keys just before the segment, NB - 1 at or
    after the segment start (``s2o_ref._sort_buckets``)."""
    r = tl.program_id(0)
    st = (first_seg + r // n_kv_heads) * SEGMENT
    offs = tl.arange(0, BLOCK)
    row = E_BITS + r.to(tl.int64) * L
    top = tl.zeros([BLOCK], tl.int32)
    for start in tl.range(0, st, BLOCK):
        j = start + offs
        top = tl.maximum(top, tl.load(row + j, mask=j < st, other=0) >> SHIFT)
    top_all = tl.max(top, 0)
    for start in tl.range(0, L, BLOCK):
        j = start + offs
        bucket = tl.minimum(tl.maximum(top_all - (tl.load(row + j, mask=j < L, other=0) >> SHIFT), 0), NB - 2)
        bucket = tl.where(j >= st - WINDOW, 0, bucket)
        bucket = tl.where(j >= st, NB - 1, bucket)
        tl.store(KEYS + r.to(tl.int64) * L + j, r * NB + bucket, mask=j < L)


@triton.jit
def _mass_budget(E, ORDER, TAU, RANK, RANK_LEN, KV_IDX, kv_beg, L, first_seg, n_kv_heads, WINDOW,
                 SEGMENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr,
                 KV_CONTIG: tl.constexpr):
    """Rank row ``program_id(0)`` from the sorted keys' order (flat indices into [rows, L]) and its planned budget
    (``s2o_ref.planned_budget``): the count of rank entries whose suffix sum of e (the mass left out from there
    on) exceeds tau, at least WINDOW, rounded up to whole blocks, at most seg_start; seg_start where tau is 0.
    SLOTS: the rank holds each key's token slot (kv_indices[kv_beg + position], or kv_beg + position when
    KV_CONTIG), what the attention kernel reads, instead of its position."""
    r = tl.program_id(0)
    hk = r % n_kv_heads
    st = (first_seg + r // n_kv_heads) * SEGMENT
    base = r.to(tl.int64) * L
    offs = tl.arange(0, BLOCK)
    for start in tl.range(st, L, BLOCK):          # entries at or after seg_start: the later keys, in order
        j = start + offs
        tl.store(RANK + base + j, _slot_of(KV_IDX, kv_beg, j, j < L, SLOTS, KV_CONTIG), mask=j < L)
    tau = tl.load(TAU + hk)
    carry = 0.0
    count = 0
    n_blk = tl.cdiv(st, BLOCK)
    for t in tl.range(0, n_blk):                  # the ranked earlier keys, last block first (suffix sums)
        i = (n_blk - 1 - t) * BLOCK + offs
        ok = i < st
        pos = (tl.load(ORDER + base + i, mask=ok, other=base) - base).to(tl.int32)
        tl.store(RANK + base + i, _slot_of(KV_IDX, kv_beg, pos, ok, SLOTS, KV_CONTIG), mask=ok)
        er = tl.load(E + base + pos, mask=ok, other=0.0)
        after = carry + tl.cumsum(er, 0, reverse=True)
        count += tl.sum(((after > tau) & ok).to(tl.int32), 0)
        carry += tl.sum(er, 0)
    n = tl.maximum(count, WINDOW)
    n = tl.minimum(tl.cdiv(n, BLOCK_N) * BLOCK_N, st)
    tl.store(RANK_LEN + r, tl.where(tau > 0, n, st))


def plan_by_mass(q: torch.Tensor, k_pool: torch.Tensor, *, kv_indices: torch.Tensor | None, kv_beg: int,
                 kv_len: int, segment_size: int, sm_scale: float, tau_kv: torch.Tensor, block_size: int,
                 local_window: int, samples: int = SAMPLES, mass_reduce: str = "mean", k_scale: float = 1.0,
                 slots: bool = False):
    """The planned rule's index of one sequence (``s2o_ref``: ``sampled_mass``, ``rank_by_mass``,
    ``planned_budget``) in a handful of launches and no host synchronisation: rank [n_seg, Hkv, L] int32
    (positions, or with ``slots`` the keys' token slots) and rank_len [n_seg, Hkv] int32.  tau_kv: [Hkv] fp32
    on the device."""
    e = sampled_mass_triton(q, k_pool, segment_size=segment_size, sm_scale=sm_scale, n_sample=samples,
                            reduce=mass_reduce, kv_indices=kv_indices, kv_beg=kv_beg, kv_len=kv_len,
                            k_scale=k_scale)
    return rank_and_budget(e, first_seg=(kv_len - q.shape[0]) // segment_size, segment_size=segment_size,
                           tau_kv=tau_kv, block_size=block_size, local_window=local_window,
                           slots=(kv_indices, kv_beg) if slots else None)


def rank_and_budget(e: torch.Tensor, *, first_seg: int, segment_size: int, tau_kv: torch.Tensor, block_size: int,
                    local_window: int, slots: tuple | None = None):
    """``s2o_ref.rank_by_mass`` and ``s2o_ref.planned_budget`` of the estimate e [n_seg, Hkv, L] (fp32, segment
    i starting at (first_seg + i) * segment_size): a sort-key kernel, one flat stable sort, a rank-and-budget
    kernel.  Returns rank [n_seg, Hkv, L] int32, rank_len [n_seg, Hkv] int32.  slots = (kv_indices or None for
    contiguous keys, kv_beg): the rank holds token slots instead of positions."""
    n_seg, Hkv, L = e.shape
    e = e.contiguous()
    keys = torch.empty(n_seg, Hkv, L, dtype=torch.int32, device=e.device)
    common = dict(SEGMENT=segment_size, BLOCK=INDEX_BLOCK, num_warps=4)
    _mass_keys[(n_seg * Hkv,)](e.view(torch.int32), keys, L, first_seg, Hkv, local_window, NB=NUM_BUCKETS,
                               SHIFT=23 - MASS_MANTISSA_BITS, **common)
    order = torch.sort(keys.view(-1), stable=True).indices
    rank = torch.empty_like(keys)
    rank_len = torch.empty(n_seg, Hkv, dtype=torch.int32, device=e.device)
    idx, kv_beg = slots if slots is not None else (None, 0)
    _mass_budget[(n_seg * Hkv,)](e, order, tau_kv, rank, rank_len, rank if idx is None else idx, kv_beg, L,
                                 first_seg, Hkv, local_window, BLOCK_N=block_size, SLOTS=slots is not None,
                                 KV_CONTIG=idx is None, **common)
    return rank, rank_len


def plan_tiles(qo_indptr: list[int], kv_indptr: list[int], *, q_tile: int, segment_size: int):
    """Host-side metadata.  Returns (tile_seq, tile_start, tile_row) lists, heaviest tiles first, and
    rows: list of (seq, seg_start) for the rank array (one row per (sequence, segment with queries))."""
    tiles, rows = [], []
    for b in range(len(qo_indptr) - 1):
        q_len = qo_indptr[b + 1] - qo_indptr[b]
        L = kv_indptr[b + 1] - kv_indptr[b]
        if q_len == 0:
            continue
        prefix = L - q_len
        seg_row = {}
        for t0 in range(prefix // q_tile * q_tile, L, q_tile):
            s = t0 // segment_size
            if s not in seg_row:
                seg_row[s] = len(rows)
                rows.append((b, s * segment_size))
            tiles.append((s * segment_size, b, t0, seg_row[s]))
    tiles.sort(key=lambda t: -t[0])
    return [t[1] for t in tiles], [t[2] for t in tiles], [t[3] for t in tiles], rows


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    # host -> device without a host synchronisation (the CPU tensor is a temporary built from Python ints)
    return x.to(device, non_blocking=True)


@dataclass(frozen=True)
class PagedPlan:
    """Everything shape-only about one batch, built once (``plan_paged``) and reused by every layer: the host
    offsets, the tile list and its device tables, and the per-tile block counts' index tensors.  With a plan,
    a launch reads nothing back from the device."""
    qo: tuple[int, ...]
    kvp: tuple[int, ...]
    q_tile: int
    block_size: int
    segment_size: int
    rows: tuple[tuple[int, int], ...]      # (sequence, seg_start) per rank row
    n_tiles: int
    meta: torch.Tensor                     # [3, n_tiles] int32: sequence, first position, rank row
    qo_d: torch.Tensor                     # [B+1] int32
    kvp_d: torch.Tensor                    # [B+1] int32
    tile_seq: torch.Tensor                 # [n_tiles] int64
    tile_intra: torch.Tensor               # [n_tiles] int64: diagonal blocks of each tile
    tile_earlier: torch.Tensor             # [n_tiles] int64: earlier-key blocks of each tile (seg_start / B)
    row_kv_beg: torch.Tensor               # [n_rows] int64: kv offset of each rank row's sequence


def plan_paged(qo_indptr, kv_indptr, *, block_size: int, segment_size: int, q_tile: int, device) -> PagedPlan:
    """Build a ``PagedPlan`` from HOST offsets (lists or CPU tensors)."""
    qo = tuple(int(x) for x in qo_indptr)
    kvp = tuple(int(x) for x in kv_indptr)
    tile_seq, tile_start, tile_row, rows = plan_tiles(list(qo), list(kvp), q_tile=q_tile, segment_size=segment_size)
    ts = torch.tensor(tile_start, dtype=torch.int64)
    seq = torch.tensor(tile_seq, dtype=torch.int64)
    L = torch.tensor([kvp[b + 1] - kvp[b] for b in range(len(qo) - 1)], dtype=torch.int64)[seq]
    seg_start = ts // segment_size * segment_size
    intra = (torch.minimum(ts + q_tile, L) - seg_start + block_size - 1) // block_size
    return PagedPlan(
        qo=qo, kvp=kvp, q_tile=q_tile, block_size=block_size, segment_size=segment_size, rows=tuple(rows),
        n_tiles=len(tile_seq),
        meta=_to_device(torch.tensor([tile_seq, tile_start, tile_row], dtype=torch.int32).view(3, -1), device),
        qo_d=_to_device(torch.tensor(qo, dtype=torch.int32), device),
        kvp_d=_to_device(torch.tensor(kvp, dtype=torch.int32), device),
        tile_seq=_to_device(seq, device), tile_intra=_to_device(intra, device),
        tile_earlier=_to_device(seg_start // block_size, device),
        row_kv_beg=_to_device(torch.tensor([kvp[b] for b, _ in rows], dtype=torch.int64), device))


def build_index(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor | None = None, *,
                qo_indptr: list[int], kv_indptr: list[int], kv_indices: torch.Tensor, segment_size: int,
                sm_scale: float, n_rows: int, block_size: int = 128, n_sample: int = 0, local_window: int = 0,
                group_reduce: str = "max", ratio: bool = False, compensate: bool = False,
                k_scale: float = 1.0, planned_tau: torch.Tensor | None = None, samples: int = SAMPLES,
                mass_reduce: str = "mean", kv_contiguous: bool = False, slots: bool = False) -> dict:
    """Per-(sequence, segment) index data in ``plan_tiles`` row order (on q's device, no host synchronisation):
    rank [n_rows, Hkv, Lmax] int32 (the ``local_window`` keys before each segment first), and when asked,
    with ``planned_tau`` ([Hkv] on the device: the "planned" rule) the rank by sampled mass and its budget
    rank_len [n_rows, Hkv] int32 (``plan_by_mass``: K read in place, through kv_indices unless kv_contiguous;
    with ``slots`` the rank holds the keys' token slots, as the kernel reads them),
    ratio [n_rows, Hkv, ceil(Lmax / block_size)] fp32 (``s2o_ref.remaining_ratio``) and
    vbar [n_rows, Hkv, D] fp32 (``s2o_ref.value_means``, needs v_pool).  An fp8 K cache is ranked on its
    dequantised keys (k * k_scale in q's dtype); vbar stays in the V cache's units (the kernel scales the output)."""
    Hkv = k_pool.shape[1]
    seqs = [b for b in range(len(qo_indptr) - 1) if qo_indptr[b + 1] > qo_indptr[b]]
    Lmax = max(kv_indptr[b + 1] - kv_indptr[b] for b in range(len(kv_indptr) - 1))
    parts: dict[str, list] = {"rank": [], "rank_len": [], "ratio": [], "vbar": []}
    for b in seqs:
        qb = q[qo_indptr[b]:qo_indptr[b + 1]]
        L = kv_indptr[b + 1] - kv_indptr[b]
        if planned_tau is not None:
            rb, n = plan_by_mass(qb, k_pool, kv_indices=None if kv_contiguous else kv_indices, kv_beg=kv_indptr[b],
                                 kv_len=L, segment_size=segment_size, sm_scale=sm_scale, tau_kv=planned_tau,
                                 block_size=block_size, local_window=local_window, samples=samples,
                                 mass_reduce=mass_reduce, k_scale=k_scale, slots=slots)
            parts["rank_len"].append(n)
        else:
            seq_slots = kv_indices[kv_indptr[b]:kv_indptr[b + 1]].long()
            k = k_pool[seq_slots]                                       # [L, Hkv, D] (ranking only)
            if k.dtype != q.dtype:
                k = k.to(q.dtype) * k_scale
            first = (L - qb.shape[0]) // segment_size
            n_seg = len(segment_range(L, qb.shape[0], segment_size))
            seg_starts = (first + torch.arange(n_seg, device=q.device)) * segment_size
            e = estimate_scores(qb, k, segment_size=segment_size, sm_scale=sm_scale, group_reduce=group_reduce,
                                n_sample=n_sample)
            rb = rank_from_scores(e, seg_starts, local_window)
            if ratio:
                rr = remaining_ratio(e, rb, seg_starts, block_size)
                parts["ratio"].append(torch.nn.functional.pad(rr, (0, -(-Lmax // block_size) - rr.shape[-1])))
            if compensate:
                parts["vbar"].append(value_means(v_pool[seq_slots].to(q.dtype), seg_starts, chunk=segment_size))
        parts["rank"].append(rb if L == Lmax else torch.nn.functional.pad(rb, (0, Lmax - L)))
    out = {name: xs[0] if len(xs) == 1 else torch.cat(xs) for name, xs in parts.items() if xs}
    if out["rank"].shape[0] != n_rows and n_rows:
        raise ValueError(f"index has {out['rank'].shape[0]} rows, the launch plans {n_rows}")
    return out


def build_rank(q: torch.Tensor, k_pool: torch.Tensor, *, qo_indptr: list[int], kv_indptr: list[int],
               kv_indices: torch.Tensor, segment_size: int, sm_scale: float, n_rows: int,
               n_sample: int = 0, recent: int = 0, group_reduce: str = "max") -> torch.Tensor:
    """Rank array [n_rows, Hkv, Lmax] int32 in ``plan_tiles`` row order (``build_index``'s rank)."""
    return build_index(q, k_pool, qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices,
                       segment_size=segment_size, sm_scale=sm_scale, n_rows=n_rows, n_sample=n_sample,
                       local_window=recent, group_reduce=group_reduce)["rank"]


def _compose_rank(rank, plan: PagedPlan, kv_indices, kv_contiguous):
    """Position-level rank rows -> token SLOTS (the kernel then needs one indirection, not two)."""
    if rank.shape[0] != len(plan.rows):
        raise ValueError(f"rank has {rank.shape[0]} rows, the launch has {len(plan.rows)} (sequence, segment) rows")
    if kv_contiguous and not any(plan.kvp[b] for b, _ in plan.rows):
        return rank
    off = plan.row_kv_beg[:, None, None]
    if kv_contiguous:
        return (rank + off).to(torch.int32)
    return kv_indices[rank.long() + off].to(torch.int32)


def fp8_audit_operands(q: torch.Tensor, k_pool: torch.Tensor, sigmas: float = AUDIT_FP8_SIGMAS):
    """The fp8 audit's operands: q8 [Tq, Hq, D] e4m3 and its per-row scale qs [Tq, Hq], k8 [slots, Hkv, D] e4m3
    (the cache itself when it is e4m3) and its per-head scale k8s [Hkv], and each row's margin [Tq, Hq] (in
    the units of q . k as stored), with no host synchronisation.

    Rounding to e4m3 (to nearest) changes each element by a relative delta with |delta| <= 2^-4, so
    q8 qs . k8 k8s - q . k = sum_d q_d k_d (delta_d + eps_d + delta_d eps_d); taking the deltas as independent
    with variance u^2 / 3 (u = 2^-4), its standard deviation is at most
    sigma = u sqrt(2/3) sqrt(sum_d q_d^2 max_t k_td^2) (the max over the head's cached keys), and a row's margin
    is ``sigmas`` x sigma.  Elements below e4m3's smallest normal (2^-6 of the scale) carry an absolute error
    of at most 2^-10 of the scale instead, left out of sigma."""
    Hq, Hkv = q.shape[1], k_pool.shape[1]
    qf = q.float()
    qs = qf.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / E4M3_MAX
    q8 = (qf / qs[..., None]).to(E4M3)
    if k_pool.dtype == E4M3:
        k8, k8s, kf = k_pool, torch.ones(Hkv, device=q.device), k_pool.float()
    else:
        kf = k_pool.float()
        k8s = kf.abs().amax((0, 2)).clamp_min(torch.finfo(torch.float32).tiny) / E4M3_MAX
        k8 = (kf / k8s[:, None]).to(E4M3)
    kmax2 = kf.square().amax(0).repeat_interleave(Hq // Hkv, 0)              # [Hq, D]
    sigma = 2.0 ** -4 * (2.0 / 3.0) ** 0.5 * (qf.square() * kmax2).sum(-1).sqrt()
    return q8, qs, k8, k8s, sigmas * sigma


def default_config(dtype, head_dim: int, q_tile: int, block_size: int):
    """(num_warps, num_stages, chunk) measured on an H200 (benchmarks/s2o.md, kernel tuning)."""
    if dtype == torch.float32:
        return 8 if q_tile >= 128 else 4, 1, 8
    if head_dim >= 128 and q_tile >= 128:
        return 8, 3, 8
    return 4, 3, 8


def _split_audit(q, k_pool, v_pool, o32, lse2, out, lse, taus, rank, rank_len, hits, plan, *, qk_scale, v_scale,
                 return_lse, block_size, segment_size, q_tile, heads, audit_n, warps, stages, num_warps, num_stages,
                 fp16, audit_last):
    """The audit after a planned pass that wrote o32 / lse2 (``s2o_paged``, split): ``_s2o_audit`` lists the hits,
    ``_s2o_hits`` attends them and writes out (and lse).  Returns the hits per (tile, q head) [n_tiles, Hq] int32."""
    Tq, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    group = Hq // Hkv
    heads = next(h for h in range(min(max(heads, 1), group), 0, -1) if group % h == 0)   # divides the group
    audit_n = min(audit_n, block_size)
    if audit_n < 16 or audit_n & (audit_n - 1):
        raise ValueError(f"audit_n must be a power of two >= 16 (keys per score product), got {audit_n}")
    n_hit = torch.empty(plan.n_tiles, Hq, dtype=torch.int32, device=q.device)
    meta = plan.meta
    ieee = q.dtype == torch.float32
    common = dict(GROUP=group, HEAD_DIM=D, BLOCK_M=q_tile, BLOCK_N=block_size, IEEE=ieee, Q_FP16=fp16)
    _with_fewer_stages(lambda st: _s2o_audit[(Hkv * (group // heads), plan.n_tiles)](
        q, k_pool, lse2, taus, rank, rank_len, hits, n_hit, plan.qo_d, plan.kvp_d, meta[0], meta[1], meta[2],
        qk_scale, hits.stride(0), q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        lse2.stride(0), lse2.stride(1), rank.stride(0), rank.stride(1), rank_len.stride(0),
        HEADS=heads, AUDIT_N=audit_n, SEGMENT=segment_size, AUDIT_LAST=audit_last, STAGES=st, **common,
        num_warps=warps, num_stages=st), stages)
    # (lse is written with return_lse only; its strides are lse2's, the same [Tq, Hq] layout)
    _with_fewer_stages(lambda st: _s2o_hits[(Hq, plan.n_tiles)](
        q, k_pool, v_pool, o32, lse2, out, lse, rank, hits, n_hit, plan.qo_d, plan.kvp_d, meta[0],
        meta[1], meta[2], qk_scale, v_scale, hits.stride(0), q.stride(0), q.stride(1), k_pool.stride(0),
        k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), o32.stride(0), o32.stride(1), out.stride(0),
        out.stride(1), lse2.stride(0), lse2.stride(1), rank.stride(0), rank.stride(1),
        RETURN_LSE=return_lse, STAGES=st, **common, num_warps=num_warps, num_stages=st), num_stages)
    return n_hit


def _with_fewer_stages(launch, stages: int) -> None:
    """``launch(stages)``, one pipeline stage fewer each time the kernel does not fit in shared memory."""
    while True:
        try:
            launch(stages)
            return
        except triton.runtime.errors.OutOfResources:
            if stages <= 1:
                raise
            stages -= 1


def s2o_paged(q, k_pool, v_pool, *, qo_indptr, kv_indptr, kv_indices, tau, block_size, segment_size, q_tile,
              sm_scale, return_lse=False, rank=None, rank_len=None, num_warps=None, num_stages=None,
              kv_contiguous=False, chunk=None, stop="block", local_window=0, compensate=False,
              tail_estimate="flat", plan: PagedPlan | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
              samples: int = SAMPLES, mass_reduce: str = "mean", audit: bool = False,
              audit_stages: int = AUDIT_STAGES, audit_fp8: bool = False, audit_last: int = 0,
              audit_split: bool = False, audit_heads: int = AUDIT_HEADS, audit_n: int = AUDIT_N,
              audit_warps: int = AUDIT_WARPS):
    """Launch the kernel.  Returns out, lse (or None), computed [B, Hq], causal [B, Hq] block counts.
    tau: float or [Hkv] tensor.  stop / local_window / compensate / tail_estimate / audit: s2o_ref's semantics;
    audit_last: audit only the tiles of the last ``audit_last`` positions (v5; 0: every tile);
    audit_stages: the audit score loop's pipelining depth; audit_fp8: the audit's scores on fp8 tensor cores
    first, the exact test on the blocks they list (``fp8_audit_operands``);
    audit_split: the audit as kernels of its own (``_s2o_audit``, ``_s2o_hits``: the same visited blocks, the
    output within fp32 rounding) instead of inside the attention kernel (not the default until it is measured
    faster on a GPU); audit_heads / audit_n / audit_warps: the split audit's q heads per program, keys per score
    product and warps.
    rank / rank_len override the S2O ranking (baselines use this to run on the same kernel).
    kv_contiguous: the caller guarantees kv_indices == arange(total) (one sequence stored in order), so
    the kernel computes slots instead of loading them.  tau = 0 without a rank skips the ranking (dense
    attention in position order; the same result up to summation order).  plan: this batch's ``plan_paged``
    (else built here from a host copy of the offsets, which synchronises with the device).  An fp8 K/V cache
    (``FP8_KV``) holds K / k_scale and V / v_scale (host floats) and is read as such, with q in bf16 or fp16;
    with bf16 q the kernel's products then run in fp16 (``_to_fp16``)."""
    Tq, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    if D not in (64, 128):
        raise ValueError(f"the S2O kernel supports head dim 64 or 128, got {D}")
    fp8 = k_pool.dtype in FP8_KV and v_pool.dtype == k_pool.dtype and q.dtype in (torch.bfloat16, torch.float16)
    if not fp8 and (q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k_pool.dtype != q.dtype
                    or v_pool.dtype != q.dtype):
        raise ValueError(f"q, k, v must share one dtype of bf16/fp16/fp32, or K/V be one fp8 dtype with q in "
                         f"bf16/fp16; got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    if k_pool.stride(2) != 1 or v_pool.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("q, k_pool, v_pool need a contiguous last (head-dim) axis")
    dev = q.device
    if plan is None:
        plan = plan_paged(qo_indptr.tolist(), kv_indptr.tolist(), block_size=block_size,
                          segment_size=segment_size, q_tile=q_tile, device=dev)
    elif (plan.block_size, plan.segment_size, plan.q_tile) != (block_size, segment_size, q_tile):
        raise ValueError(f"the plan was made for block/segment/tile {plan.block_size}/{plan.segment_size}/"
                         f"{plan.q_tile}, the launch asks for {block_size}/{segment_size}/{q_tile}")
    qo, kvp, rows = list(plan.qo), list(plan.kvp), plan.rows
    B = len(qo) - 1
    out = torch.empty_like(q)
    lse = torch.empty(Tq, Hq, dtype=torch.float32, device=dev) if return_lse else out.new_empty(1, 1,
                                                                                               dtype=torch.float32)
    computed = torch.zeros(B, Hq, dtype=torch.int64, device=dev)
    causal = torch.zeros_like(computed)
    if not plan.n_tiles:
        return out, (lse if return_lse else None), computed, causal
    check_settings(stop, local_window, compensate, tail_estimate, samples, mass_reduce,
                   rank_given=rank is not None or rank_len is not None, audit=audit, audit_last=audit_last)
    taus_host = tau_per_head(tau.cpu() if torch.is_tensor(tau) else tau, Hkv, "cpu")
    taus = _to_device(taus_host, dev)
    planned = stop == "planned" and float(taus_host.max()) > 0
    rank_slots = False                # the planned index composes the slots itself
    if planned:
        # the budget is planned before the launch; the kernel visits it whole (no test inside the scan), then
        # audits the rest with ``audit``
        index = build_index(q, k_pool, qo_indptr=qo, kv_indptr=kvp, kv_indices=kv_indices,
                            segment_size=segment_size, sm_scale=sm_scale, n_rows=len(rows), block_size=block_size,
                            local_window=local_window, k_scale=k_scale, planned_tau=taus, samples=samples,
                            mass_reduce=mass_reduce, kv_contiguous=kv_contiguous, slots=True)
        rank, rank_len = index["rank"], index["rank_len"]
        rank_slots = True
        if not audit:
            taus = torch.zeros_like(taus)         # (the audit reads tau; nothing else does in this mode)
        taus_host = torch.zeros_like(taus_host)
        local_window, compensate = 0, False
    if float(taus_host.max()) > 0:
        mode = MODE_EARLY_STOP
    else:
        mode = MODE_RANKED_ALL if rank is not None else MODE_DENSE
    has_ratio = mode == MODE_EARLY_STOP and stop == "remaining" and tail_estimate == "estimate"
    compensate = compensate and mode == MODE_EARLY_STOP
    ratio = vbar = None
    if mode != MODE_DENSE and (rank is None or has_ratio or compensate):
        if rank is not None and has_ratio:
            raise ValueError("tail_estimate='estimate' needs S2O's own ranking (no rank override)")
        index = build_index(q, k_pool, v_pool, qo_indptr=qo, kv_indptr=kvp, kv_indices=kv_indices,
                            segment_size=segment_size, sm_scale=sm_scale, n_rows=len(rows), block_size=block_size,
                            local_window=local_window if rank is None else 0, ratio=has_ratio,
                            compensate=compensate, k_scale=k_scale)
        rank = index["rank"] if rank is None else rank
        ratio, vbar = index.get("ratio"), index.get("vbar")
    forced = -(-local_window // block_size) if rank_len is None else 0
    if rank is None:
        rank = torch.zeros(1, 1, 1, dtype=torch.int32, device=dev)
    elif not rank_slots:
        rank = _compose_rank(rank, plan, kv_indices, kv_contiguous)
    n_tiles = plan.n_tiles
    meta = plan.meta
    visited = torch.empty(n_tiles, Hq, dtype=torch.int32, device=dev)
    unread = taus.view(1, 1, -1)                     # what the kernel takes for a table it does not read
    rl = rank_len if rank_len is not None else unread[0]
    ratio = ratio if ratio is not None else unread
    vbar = vbar if vbar is not None else unread
    nw, ns, ch = default_config(q.dtype, D, q_tile, block_size)
    num_warps = num_warps or nw
    num_stages = num_stages or ns
    chunk = chunk or ch
    audit = audit and planned
    # the audit's hit list: one row per program, room for every earlier-key block of the longest sequence
    hits = torch.empty(n_tiles * Hq if audit else 1, max(kvp[b + 1] - kvp[b] for b in range(B)) // block_size
                       if audit else 1, dtype=torch.int32, device=dev)
    audit_fp8 = audit and audit_fp8
    if audit_split and audit_fp8:
        raise ValueError("the fp8 audit runs inside the attention kernel: audit_split=True cannot take audit_fp8")
    split = audit and audit_split
    if audit_fp8:
        q8, qs, k8, k8s, marg = fp8_audit_operands(q, k_pool)
    else:
        q8 = qs = marg = k8 = k8s = taus                  # not read
    o_main, lse_main, vs_main = out, lse, v_scale
    if split:
        # the planned pass writes the normalised output in fp32 and the log2 log-sum-exp: the audit's thresholds
        # and, with the hits, ``_s2o_hits``'s starting state
        o_main = torch.empty(Tq, Hq, D, dtype=torch.float32, device=dev)
        lse_main = torch.empty(Tq, Hq, dtype=torch.float32, device=dev)
        vs_main = 1.0
    ret_main = return_lse or split
    args = (q, k_pool, v_pool, o_main, lse_main, visited,
            kv_indices, plan.qo_d, plan.kvp_d, meta[0], meta[1], meta[2], rank, rl,
            taus, ratio, vbar, hits, q8, qs, marg, k8, k8s, sm_scale * LOG2E * k_scale, vs_main, forced,
            hits.stride(0), q8.stride(0) if audit_fp8 else 0, q8.stride(1) if audit_fp8 else 0,
            qs.stride(0) if audit_fp8 else 0, k8.stride(0) if audit_fp8 else 0, k8.stride(1) if audit_fp8 else 0,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
            o_main.stride(0), o_main.stride(1), lse_main.stride(0) if ret_main else 0,
            lse_main.stride(1) if ret_main else 0,
            rank.stride(0), rank.stride(1), rl.stride(0), ratio.stride(0), ratio.stride(1), vbar.stride(0),
            vbar.stride(1))
    kw = dict(GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_M=q_tile, BLOCK_N=block_size, SEGMENT=segment_size,
              HAS_RANK_LEN=rank_len is not None, RETURN_LSE=ret_main, IEEE=q.dtype == torch.float32,
              STOP=STOP_BLOCK if stop == "block" else STOP_REMAINING, HAS_RATIO=has_ratio, COMPENSATE=compensate)
    audit_stages = audit_stages if audit else 1
    while True:
        try:
            _s2o_fwd[(Hq, n_tiles)](*args, **kw, KV_CONTIG=kv_contiguous, MODE=mode, CHUNK=chunk, STAGES=num_stages,
                                    AUDIT=audit and not split, AUDIT_STAGES=audit_stages, AUDIT_FP8=audit_fp8,
                                    AUDIT_LAST=audit_last if audit else 0,
                                    Q_FP16=fp8 and q.dtype == torch.bfloat16, LSE_LOG2=split,
                                    num_warps=num_warps, num_stages=num_stages)
            break
        except triton.runtime.errors.OutOfResources:
            if num_stages <= 1 and audit_stages <= 1:
                raise
            # e.g. fp32 K/V blocks: fewer pipeline buffers fit in shared memory
            if audit_stages > num_stages:
                audit_stages -= 1
            else:
                num_stages = max(1, num_stages - 1)
    if split:
        n_hit = _split_audit(q, k_pool, v_pool, o_main, lse_main, out, lse, taus, rank, rank_len, hits, plan,
                             qk_scale=sm_scale * LOG2E * k_scale, v_scale=v_scale, return_lse=return_lse,
                             block_size=block_size, segment_size=segment_size, q_tile=q_tile,
                             heads=audit_heads, audit_n=audit_n, warps=audit_warps, stages=audit_stages,
                             num_warps=num_warps, num_stages=num_stages, fp16=fp8 and q.dtype == torch.bfloat16,
                             audit_last=audit_last)
        visited += n_hit
    # block counts on the (tile x block) grid, per sequence and head
    computed.index_add_(0, plan.tile_seq, visited.long() + plan.tile_intra[:, None])
    causal.index_add_(0, plan.tile_seq, (plan.tile_intra + plan.tile_earlier)[:, None].expand(-1, Hq))
    return out, (lse if return_lse else None), computed, causal
