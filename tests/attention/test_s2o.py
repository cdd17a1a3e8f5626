"""S2O on the CPU: the fp32 reference against dense attention, and the Triton kernel (TRITON_INTERPRET=1,
set below before triton is imported) against the reference at tiny awkward shapes.

Tolerances: the reference and the kernel both run fp32 here, so tau = 0 differs from dense attention only
by summation order (~1e-6 relative); 1e-4 leaves room for the reordering and nothing else."""

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

from sgl_slim.attention import (dense_attention_ref, s2o_attention, s2o_attention_paged,  # noqa: E402
                                s2o_attention_ref)
from sgl_slim.attention.baselines import select_pbs, select_topcdf  # noqa: E402
from sgl_slim.attention.inputs import make_qkv  # noqa: E402
from sgl_slim.attention.s2o_ref import rank_keys  # noqa: E402


def _density(cnt):
    return (cnt["computed"].sum() / cnt["causal"].sum()).item()


# ----------------------------------------------------------------------------------------- reference
def test_import_needs_neither_triton_nor_sglang():
    code = ("import sys, sgl_slim.attention; "
            "bad = [m for m in ('triton', 'sglang', 'sgl_slim.attention.s2o_triton') if m in sys.modules]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": ""})
    assert res.returncode == 0, f"import sgl_slim.attention pulled in: {res.stderr[-500:]}"


def test_tau0_equals_dense_sdpa():
    q, k, v = make_qkv(700, 8, 2, 32, seed=0, dtype=torch.float32)
    out, stats = s2o_attention(q, k, v, tau=0.0, block_size=32, segment_size=128, return_stats=True)
    G = 4
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(G, 1).transpose(0, 1), v.repeat_interleave(G, 1).transpose(0, 1),
        is_causal=True).transpose(0, 1)
    assert stats["density"] == 1.0, f"tau=0 must visit every block, density {stats['density']}"
    err = (out - ref).abs().max().item()
    assert err < 1e-4, f"tau=0 differs from dense SDPA by {err}"


def test_density_never_increases_with_tau_and_error_shrinks_to_zero():
    q, k, v = make_qkv(768, 4, 1, 32, seed=1, dtype=torch.float32)
    dense, _ = dense_attention_ref(q, k, v)
    rank = rank_keys(q, k, segment_size=128, sm_scale=32 ** -0.5)
    dens, errs = [], []
    for tau in [0.0, 1e-3, 1e-1, 1.0]:
        out, _, cnt = s2o_attention_ref(q, k, v, tau=tau, block_size=32, segment_size=128, q_tile=64, rank=rank)
        dens.append(_density(cnt))
        errs.append(((out - dense).norm() / dense.norm()).item())
    assert all(a >= b for a, b in zip(dens, dens[1:])), f"density must not increase with tau: {dens}"
    assert dens[-1] < 0.6, f"tau=1 should skip most of the prefix on structured inputs, density {dens[-1]}"
    assert errs[0] < 1e-5, f"tau=0 rel error {errs[0]}"


def test_diagonal_blocks_never_skipped():
    # tau huge: the ranked pass stops after its first block unless that block dwarfs everything before it
    # (then the accumulated mass rescales to ~0 and the scan rightly goes on), so per head
    # computed >= intra blocks + 1 per tile with a prefix, and with few exceptions equal to it
    L, B, S, M = 640, 32, 128, 64
    q, k, v = make_qkv(L, 4, 2, 32, seed=2, dtype=torch.float32)
    out, _, cnt = s2o_attention_ref(q, k, v, tau=1e9, block_size=B, segment_size=S, q_tile=M)
    expect = 0
    for t0 in range(0, L, M):
        seg_start = t0 // S * S
        intra = -(-(min(t0 + M, L) - seg_start) // B)
        expect += intra + (1 if seg_start > 0 else 0)
    got = cnt["computed"].tolist()
    assert all(expect <= c <= expect + 2 for c in got), f"computed {got}, expected {expect} (+ at most 2) per head"
    # and the rows' own segment is exact: queries of segment 0 equal dense attention
    dense, _ = dense_attention_ref(q, k, v)
    assert (out[:S] - dense[:S]).abs().max() < 1e-5, "first segment must be exact (intra pass only)"


@pytest.mark.parametrize("case", ["length1", "huge_logits", "dominant_key"])
def test_finite_on_adversarial_inputs(case):
    torch.manual_seed(0)
    L = 1 if case == "length1" else 300
    q, k, v = torch.randn(L, 4, 32), torch.randn(L, 2, 32), torch.randn(L, 2, 32)
    if case == "huge_logits":
        q, k = q * 1e3, k * 1e3
    if case == "dominant_key":
        k[5] = q.mean((0, 1)) * 1e3
    for tau in (0.0, 1e-2):
        out, lse, _ = s2o_attention_ref(q, k, v, tau=tau, block_size=32, segment_size=128, q_tile=64)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), f"{case} tau={tau}: non-finite output"
    if case == "length1":
        assert torch.allclose(out, v.repeat_interleave(2, 1)), "one token attends only to itself"


def test_prefix_reference_matches_full_sequence_rows():
    # queries after a cached prefix see exactly what the same rows see in the full sequence (tau = 0)
    q, k, v = make_qkv(500, 4, 1, 32, seed=3, dtype=torch.float32)
    full, _ = dense_attention_ref(q, k, v)
    tail, _, _ = s2o_attention_ref(q[300:], k, v, tau=0.0, block_size=32, segment_size=128, q_tile=64)
    assert (tail - full[300:]).abs().max() < 1e-5


def test_baselines_select_within_prefix_and_gamma_one_is_dense():
    q, k, v = make_qkv(512, 4, 1, 32, seed=4, dtype=torch.float32)
    dense, _ = dense_attention_ref(q, k, v)
    for sel in (select_pbs, select_topcdf):
        rank, rank_len = sel(q, k, gamma=1.0, block_size=32, segment_size=128, sm_scale=32 ** -0.5)
        seg_starts = torch.arange(rank.shape[0]) * 128
        assert (rank_len[:, 0] == seg_starts).all(), f"{sel.__name__}: gamma=1 must keep every earlier block"
        for s in range(rank.shape[0]):
            got = sorted(rank[s, 0, : rank_len[s, 0]].tolist())
            assert got == list(range(int(seg_starts[s]))), f"{sel.__name__}: segment {s} is not a permutation"
        out, _, _ = s2o_attention_ref(q, k, v, tau=0.0, block_size=32, segment_size=128, q_tile=64, rank=rank,
                                      rank_len=rank_len)
        assert (out - dense).abs().max() < 1e-5


def test_paged_cpu_path_runs_reference_per_sequence():
    torch.manual_seed(0)
    kp, vp = torch.randn(900, 2, 32), torch.randn(900, 2, 32)
    idx = torch.randperm(900)[:800].int()
    q = torch.randn(300, 4, 32)
    out, lse, stats = s2o_attention_paged(q, kp, vp, qo_indptr=torch.tensor([0, 100, 300]),
                                          kv_indptr=torch.tensor([0, 500, 800]), kv_indices=idx, tau=0.0,
                                          block_size=32, segment_size=128, return_lse=True, return_stats=True)
    for b, (q0, q1, k0, k1) in enumerate([(0, 100, 0, 500), (100, 300, 500, 800)]):
        ref, ref_lse = dense_attention_ref(q[q0:q1], kp[idx[k0:k1].long()], vp[idx[k0:k1].long()])
        assert (out[q0:q1] - ref).abs().max() < 1e-5, f"sequence {b} output"
        assert (lse[q0:q1] - ref_lse).abs().max() < 1e-5, f"sequence {b} lse"
    assert stats["density_per_seq"] == [1.0, 1.0]


@pytest.mark.parametrize("need_lse", [True, False])
def test_cpu_dense_fast_path_equals_block_reference(monkeypatch, need_lse):
    """tau 0 on the CPU skips the block-by-block reference (batched fp32 matmuls or SDPA, query rows in
    chunks): same output as s2o_attention_ref at tau 0, with a cached prefix, GQA, and chunk edges that do not
    fall on sequence edges. fp32 both ways: only summation order differs (~1e-6)."""
    import sgl_slim.attention as attn

    monkeypatch.setattr(attn, "DENSE_Q_CHUNK", 48)
    torch.manual_seed(1)
    kp, vp = torch.randn(700, 2, 32), torch.randn(700, 2, 32)
    idx = torch.randperm(700)[:600].int()
    q = torch.randn(250, 8, 32)
    qo, kvp = [0, 130, 250], [0, 400, 600]          # prefixes 270 and 80
    res = s2o_attention_paged(q, kp, vp, qo_indptr=torch.tensor(qo), kv_indptr=torch.tensor(kvp),
                              kv_indices=idx, tau=0.0, block_size=32, segment_size=128, return_lse=need_lse,
                              return_stats=True)
    out, stats = res[0], res[-1]
    for b in range(2):
        slots = idx[kvp[b]:kvp[b + 1]].long()
        ref, ref_lse, cnt = s2o_attention_ref(q[qo[b]:qo[b + 1]], kp[slots], vp[slots], tau=0.0, block_size=32,
                                              segment_size=128, q_tile=128)
        assert _density(cnt) == 1.0
        assert (out[qo[b]:qo[b + 1]] - ref).abs().max() < 1e-5, f"sequence {b} output"
        if need_lse:
            assert (res[1][qo[b]:qo[b + 1]] - ref_lse).abs().max() < 1e-5, f"sequence {b} lse"
    assert stats["density_per_seq"] == [1.0, 1.0]


def _fp8_cache(k, v, k_scale, v_scale, dtype=torch.float8_e4m3fn):
    """K/V stored as an fp8 KV cache stores them (x / scale), and the values that cache stands for."""
    k8, v8 = (k.float() / k_scale).to(dtype), (v.float() / v_scale).to(dtype)
    return k8, v8, k8.float() * k_scale, v8.float() * v_scale


@pytest.mark.parametrize("tau,variant", [(0.0, "v2"), (0.02, "v2"), (1e-3, "v1")])
def test_fp8_kv_pool_reads_the_dequantised_cache(tau, variant):
    # an fp8 pool with scales is S2O on the values the cache stands for: with power-of-two scales those are
    # exact bf16 values, so the bf16 pool holding them must give the SAME output, lse and visited blocks
    L, Hq, Hkv, D = 700, 4, 2, 64
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=8, dtype=torch.bfloat16)
    k8, v8, kd, vd = _fp8_cache(k, v, 0.25, 2.0)
    ind = torch.tensor([0, L])
    idx = torch.arange(L, dtype=torch.int32)
    kw = dict(qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=tau, block_size=64, segment_size=128,
              return_lse=True, return_stats=True, variant=variant)
    o8, l8, s8 = s2o_attention_paged(q, k8, v8, k_scale=0.25, v_scale=2.0, **kw)
    ob, lb, sb = s2o_attention_paged(q, kd.bfloat16(), vd.bfloat16(), **kw)
    assert torch.equal(o8, ob), f"tau {tau}: fp8 pool output differs from its dequantised values'"
    assert torch.equal(l8, lb) and s8 == sb
    # and the scales are applied (without them the output is that of K/scale, V/scale)
    o_raw, _, _ = s2o_attention_paged(q, k8, v8, **kw)
    assert (o_raw.float() - o8.float()).abs().max() > 0.1


def test_fp8_kv_pool_is_checked_by_name():
    q = torch.randn(8, 4, 32, dtype=torch.bfloat16)
    k8 = torch.randn(8, 2, 32).to(torch.float8_e4m3fn)
    ind, idx = torch.tensor([0, 8]), torch.arange(8, dtype=torch.int32)
    kw = dict(qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=0.01)
    with pytest.raises(ValueError, match="fp8 K/V pool"):
        s2o_attention_paged(q.float(), k8, k8, **kw)                       # fp32 queries
    with pytest.raises(ValueError, match="fp8 K/V pool"):
        s2o_attention_paged(q, k8, k8.to(torch.float8_e5m2), **kw)         # mixed fp8 dtypes
    with pytest.raises(ValueError, match="k_scale"):
        s2o_attention_paged(q, k8, k8, k_scale=0.0, **kw)


def test_api_rejects_bad_arguments_by_name():
    q, k = torch.randn(8, 4, 32), torch.randn(8, 3, 32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        s2o_attention(q, k, k, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        s2o_attention(q, torch.randn(8, 2, 32), torch.randn(8, 2, 32), tau=-1.0)
    k2 = torch.randn(8, 2, 32)
    with pytest.raises(ValueError, match="one floating-point dtype"):      # the CPU path as the kernel's
        s2o_attention(q.half(), k2, k2, tau=0.01)
    with pytest.raises(ValueError, match="one floating-point dtype"):
        s2o_attention(q.long(), k2.long(), k2.long(), tau=0.01)


@pytest.mark.parametrize("qo, kvp, n_idx, match", [
    ([0, 12], [0, 12], 12, "covers 12 query rows, q has 10"),      # offsets past q's rows
    ([0, 4, 10], [0, 12], 12, "B \\+ 1"),                        # offset lists of different lengths
    ([0, 10], [0, 8], 8, "10 queries and 8 keys"),
    ([0, 10], [0, 14], 12, "kv_indices has 12"),
    ([1, 10], [0, 12], 12, "starting at 0"),
])
def test_paged_api_checks_the_offsets_against_the_tensors(qo, kvp, n_idx, match):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(10, 4, 32, generator=g), torch.randn(16, 2, 32, generator=g)
    with pytest.raises(ValueError, match=match):
        s2o_attention_paged(q, k, k, qo_indptr=torch.tensor(qo), kv_indptr=torch.tensor(kvp),
                            kv_indices=torch.arange(n_idx, dtype=torch.int32), tau=0.01)


def test_a_plan_checks_its_offsets_once_when_it_is_made():
    # with a plan, a layer's call checks only the totals; the offsets' structure is checked by plan_paged
    from sgl_slim.attention import plan_paged
    with pytest.raises(ValueError, match="10 queries and 8 keys"):
        plan_paged([0, 10], [0, 8], device="cpu")
    with pytest.raises(ValueError, match="starting at 0"):
        plan_paged([1, 10], [0, 12], device="cpu")


# ---------------------------------------------------------------------- Triton kernel (interpreter)
triton = pytest.importorskip("triton")


def _kernel(q, k_pool, v_pool, qo, kvp, idx, tau, B, S, M, rank=None, rank_len=None):
    from sgl_slim.attention import s2o_triton
    return s2o_triton.s2o_paged(q, k_pool, v_pool, qo_indptr=torch.tensor(qo), kv_indptr=torch.tensor(kvp),
                                kv_indices=idx, tau=tau, block_size=B, segment_size=S, q_tile=M,
                                sm_scale=q.shape[2] ** -0.5, return_lse=True, rank=rank, rank_len=rank_len)


@pytest.mark.parametrize("L,Hq,Hkv,tau", [(97, 5, 1, 0.0), (1025, 4, 1, 1e-2)])
def test_kernel_matches_reference(L, Hq, Hkv, tau):
    q, k, v = make_qkv(L, Hq, Hkv, 64, seed=5, dtype=torch.float32)
    idx = torch.arange(L, dtype=torch.int32)
    out, lse, comp, caus = _kernel(q, k, v, [0, L], [0, L], idx, tau, 64, 256, 64)
    ref, ref_lse, cnt = s2o_attention_ref(q, k, v, tau=tau, block_size=64, segment_size=256, q_tile=64)
    assert (out - ref).abs().max() < 1e-4, f"L={L} GQA {Hq}:{Hkv}: max error {(out - ref).abs().max()}"
    assert (lse - ref_lse).abs().max() < 1e-4, "lse differs"
    assert comp.sum(0).tolist() == cnt["computed"].tolist(), "visited blocks differ from the reference"
    assert caus.sum(0).tolist() == cnt["causal"].tolist()


@pytest.mark.parametrize("q_mult", [1.0, 2.0 ** 17])
@pytest.mark.parametrize("variant", ["dense", "v2"])
def test_kernel_reads_an_fp8_pool_with_fp16_products(q_mult, variant):
    # an fp8 cache with bf16 q: the kernel's products run in fp16, where the cache's values are exact and so is q
    # while |q| < 2^14.  q_mult 2^17 (the logits kept equal through sm_scale) puts q beyond fp16's range: the tile
    # is scaled by a power of two first (else inf logits, NaN).  The interpreter computes fp16 products in numpy's
    # fp16 (not fp32-accumulated as on the GPU, whose test holds the precision), so this checks the semantics:
    # scales, the range guard, the visited blocks, at 1e-2 rel-L2 (a wrong scale or a lost block gives > 10%) and
    # 5e-2 in lse (numpy's fp16 sum of a logit near 150 steps by 0.125: 0.016 nats after the 1/8 scale).  (v2: its
    # index is torch ops; the planned index's kernels take bf16 products, which the interpreter does not emulate)
    from sgl_slim.attention import VARIANTS, s2o_triton
    L, Hq, Hkv, D = 700, 4, 2, 64
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=8, dtype=torch.float32)
    q = (q * q_mult).bfloat16()
    k8, v8, kd, vd = _fp8_cache(k, v, 0.25, 2.0)
    settings = {} if variant == "dense" else {**VARIANTS[variant], "local_window": 64, "samples": 4}
    tau, scale = (0.0 if variant == "dense" else 0.02), D ** -0.5 / q_mult
    out, lse, comp, _ = s2o_triton.s2o_paged(
        q, k8, v8, qo_indptr=torch.tensor([0, L]), kv_indptr=torch.tensor([0, L]),
        kv_indices=torch.arange(L, dtype=torch.int32), tau=tau, block_size=64, segment_size=128, q_tile=64,
        sm_scale=scale, return_lse=True, k_scale=0.25, v_scale=2.0, **settings)
    ref, ref_lse, cnt = s2o_attention_ref(q.float(), kd, vd, tau=tau, block_size=64, segment_size=128, q_tile=64,
                                          sm_scale=scale, **settings)
    assert torch.isfinite(out).all(), "fp16 overflow"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"rel-L2 {err:.3g} against the reference on the cache's values"
    assert (lse - ref_lse).abs().max() < 5e-2
    assert comp.sum(0).tolist() == cnt["computed"].tolist(), "visited blocks differ from the reference"


def test_kernel_varlen_prefix_pool():
    torch.manual_seed(1)
    Hq, Hkv, D = 4, 1, 64
    k_pool, v_pool = torch.randn(800, Hkv, D), torch.randn(800, Hkv, D)
    perm = torch.randperm(800).int()
    lens = [(330, 70), (200, 200), (129, 1)]        # (kv_len, q_len): prefixes 260, 0, 128
    qo, kvp, idx, off = [0], [0], [], 0
    for kv, ql in lens:
        idx.append(perm[off:off + kv])
        off += kv
        qo.append(qo[-1] + ql)
        kvp.append(kvp[-1] + kv)
    q = torch.randn(qo[-1], Hq, D)
    out, lse, comp, caus = _kernel(q, k_pool, v_pool, qo, kvp, torch.cat(idx), 0.0, 64, 128, 64)
    for b, (kv, ql) in enumerate(lens):
        slots = idx[b].long()
        ref, ref_lse, cnt = s2o_attention_ref(q[qo[b]:qo[b + 1]], k_pool[slots], v_pool[slots], tau=0.0,
                                              block_size=64, segment_size=128, q_tile=64)
        assert (out[qo[b]:qo[b + 1]] - ref).abs().max() < 1e-4, f"sequence {b} output"
        assert (lse[qo[b]:qo[b + 1]] - ref_lse).abs().max() < 1e-4, f"sequence {b} lse"
        assert comp[b].tolist() == cnt["computed"].tolist() and caus[b].tolist() == cnt["causal"].tolist()


@pytest.mark.parametrize("chunk", [1, 3])
def test_kernel_early_stop_chunks_match_reference(chunk):
    # chunks smaller than the ranked pass: the stop must land on the same block whatever the chunk
    # (blocks after the stop inside a chunk are masked out), over a shuffled pool (slots via the rank)
    L, Hq, Hkv, D = 900, 2, 1, 64
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=6, dtype=torch.float32)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:L].int()
    k_pool, v_pool = torch.zeros(1000, Hkv, D), torch.zeros(1000, Hkv, D)
    k_pool[perm.long()], v_pool[perm.long()] = k, v
    from sgl_slim.attention import s2o_triton
    out, lse, comp, _ = s2o_triton.s2o_paged(q, k_pool, v_pool, qo_indptr=torch.tensor([0, L]),
                                             kv_indptr=torch.tensor([0, L]), kv_indices=perm, tau=0.05,
                                             block_size=64, segment_size=128, q_tile=64, sm_scale=D ** -0.5,
                                             return_lse=True, chunk=chunk)
    ref, ref_lse, cnt = s2o_attention_ref(q, k, v, tau=0.05, block_size=64, segment_size=128, q_tile=64)
    assert comp.sum(0).tolist() == cnt["computed"].tolist(), f"chunk {chunk}: visited blocks differ"
    assert (out - ref).abs().max() < 1e-4 and (lse - ref_lse).abs().max() < 1e-4, f"chunk {chunk}: output"


def test_kernel_baseline_rank_on_shuffled_pool():
    # tau = 0 with a given rank and per-row lengths (the baselines' path), slots through kv_indices
    L, Hq, Hkv, D = 640, 2, 1, 64
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=7, dtype=torch.float32)
    rank, rank_len = select_pbs(q, k, gamma=0.9, block_size=64, segment_size=128, sm_scale=D ** -0.5)
    perm = torch.randperm(700, generator=torch.Generator().manual_seed(1))[:L].int()
    k_pool, v_pool = torch.zeros(700, Hkv, D), torch.zeros(700, Hkv, D)
    k_pool[perm.long()], v_pool[perm.long()] = k, v
    out, lse, comp, _ = _kernel(q, k_pool, v_pool, [0, L], [0, L], perm, 0.0, 64, 128, 64, rank=rank,
                                rank_len=rank_len)
    ref, ref_lse, cnt = s2o_attention_ref(q, k, v, tau=0.0, block_size=64, segment_size=128, q_tile=64,
                                          rank=rank, rank_len=rank_len)
    assert comp.sum(0).tolist() == cnt["computed"].tolist(), "visited blocks differ from the reference"
    assert (out - ref).abs().max() < 1e-4 and (lse - ref_lse).abs().max() < 1e-4


def test_value_means_are_the_means_of_the_keys_before_each_segment():
    from sgl_slim.attention.s2o_ref import value_means
    v = torch.randn(1000, 2, 8, generator=torch.Generator().manual_seed(0))
    seg_starts = torch.tensor([0, 256, 512, 768])
    got = value_means(v, seg_starts, chunk=256)
    want = torch.stack([v[:s].mean(0) if s else torch.zeros(2, 8) for s in seg_starts.tolist()])
    assert (got - want).abs().max() < 1e-6, "value_means must equal the mean of V over [0, seg_start)"


def test_early_stop_settings_are_checked_by_name():
    q, k, v = make_qkv(64, 2, 1, 32, seed=0, dtype=torch.float32)
    for bad, match in [({"stop": "sometimes"}, "stop"), ({"tail_estimate": "guess"}, "tail_estimate"),
                       ({"local_window": -1}, "local_window"), ({"stop": "block", "compensate": True}, "compensate")]:
        with pytest.raises(ValueError, match=match):
            s2o_attention_ref(q, k, v, tau=0.1, block_size=16, segment_size=32, q_tile=32, **bad)


# ----------------------------------------------------------------------------------- planned budget (v3)
def _softmax_rows(q, k, scale):
    """Exact causal softmax [Hq, Tq, L] of the last Tq positions (fp32)."""
    G = q.shape[1] // k.shape[1]
    L, Tq = k.shape[0], q.shape[0]
    s = q.float().transpose(0, 1) @ k.float().repeat_interleave(G, 1).permute(1, 2, 0) * scale
    late = torch.arange(L)[None, None, :] > torch.arange(L - Tq, L)[None, :, None]
    return torch.softmax(s.masked_fill(late, float("-inf")), -1)


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("L,Tq", [(700, 700), (900, 333)])
def test_sampled_mass_is_the_sampled_rows_softmax(reduce, L, Tq):
    from sgl_slim.attention.s2o_ref import sampled_mass, sampled_rows
    q, k, _ = make_qkv(L, 6, 2, 32, seed=12, dtype=torch.float32)
    q = q[L - Tq:]
    e = sampled_mass(q, k, segment_size=128, sm_scale=0.2, n_sample=5, reduce=reduce)
    p = _softmax_rows(q, k, 0.2)                                    # [Hq, Tq, L]
    first = (L - Tq) // 128
    for si in range(e.shape[0]):
        st = (first + si) * 128
        lo, hi = max(L - Tq, st), min(L, st + 128)
        rows = sampled_rows(torch.tensor([lo]), torch.tensor([hi]), 5)[0] - (L - Tq)
        for h in range(2):
            ps = p[h * 3:(h + 1) * 3, rows, :st]                    # the group's heads x the sampled rows
            want = ps.mean((0, 1)) if reduce == "mean" else ps.amax((0, 1))
            assert torch.allclose(e[si, h, :st], want, atol=1e-6), f"segment {si} head {h}"
            assert not e[si, h, st:].any(), "keys at or after seg_start must have no estimate"


def test_sampled_rows_are_evenly_strided_inside_each_segment():
    from sgl_slim.attention.s2o_ref import sampled_rows
    rows = sampled_rows(torch.tensor([0, 2048, 4096]), torch.tensor([2048, 4096, 4100]), 4)
    assert rows.tolist() == [[256, 768, 1280, 1792], [2304, 2816, 3328, 3840], [4096, 4097, 4098, 4099]]


def test_planned_budget_is_the_fewest_blocks_within_tau():
    from sgl_slim.attention.s2o_ref import planned_budget, rank_by_mass
    gen = torch.Generator().manual_seed(0)
    e = torch.rand(3, 2, 512, generator=gen) ** 8 / 40
    seg_starts = torch.tensor([0, 256, 512])
    rank = rank_by_mass(e, seg_starts)
    for tau in [0.3, 0.05, 1e-3]:
        n = planned_budget(e, rank, seg_starts, torch.tensor([tau, tau / 2]), 16)
        for s in range(3):
            for h, t in enumerate([tau, tau / 2]):
                st, m = int(seg_starts[s]), int(n[s, h])
                er = e[s, h][rank[s, h, :st].long()]
                assert m % 16 == 0 or m == st
                assert er[m:].sum() <= t + 1e-6, f"dropped estimate {er[m:].sum():.4g} > tau {t}"
                if m >= 16:
                    assert er[m - 16:].sum() > t, "one block fewer would also be within tau: not the fewest"
    assert planned_budget(e, rank, seg_starts, torch.zeros(2), 16).tolist() == [[0, 0], [256, 256], [512, 512]]
    win = planned_budget(e, rank_by_mass(e, seg_starts, 100), seg_starts, torch.tensor([1.0, 1.0]), 16, 100)
    assert win.tolist() == [[0, 0], [112, 112], [112, 112]], "the local window is always visited (whole blocks)"


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_planned_rule_drops_at_most_tau_of_the_sampled_rows_mass(reduce):
    """The stated bound: on the sampled rows the estimate is exact, so the mass the planned budget drops is at
    most tau on average over those rows ("mean") or in every one of them ("max")."""
    from sgl_slim.attention.s2o_ref import planned_budget, rank_by_mass, sampled_mass, sampled_rows
    L, S = 1024, 256
    q, k, _ = make_qkv(L, 4, 1, 32, seed=13, dtype=torch.float32)
    p = _softmax_rows(q, k, 32 ** -0.5)
    e = sampled_mass(q, k, segment_size=S, sm_scale=32 ** -0.5, n_sample=8, reduce=reduce)
    seg_starts = torch.arange(4) * S
    rank = rank_by_mass(e, seg_starts)
    for tau in [0.1, 0.01]:
        n = planned_budget(e, rank, seg_starts, torch.tensor([tau]), 32)
        for s in range(1, 4):
            st = s * S
            kept = torch.zeros(L, dtype=torch.bool)
            kept[rank[s, 0, :n[s, 0]].long()] = True
            rows = sampled_rows(torch.tensor([st]), torch.tensor([st + S]), 8)[0]
            dropped = p[:, rows, :st][..., ~kept[:st]].sum(-1)                  # [Hq, rows]
            worst = dropped.mean() if reduce == "mean" else dropped.max()
            assert worst <= tau + 1e-5, f"{reduce} tau {tau} segment {s}: dropped {worst:.4g}"


def test_planned_error_follows_tau_on_the_reference():
    q, k, v = make_qkv(1536, 8, 2, 64, seed=14, dtype=torch.float32)
    dense, _ = dense_attention_ref(q, k, v)
    dens, errs = [], []
    for tau in [0.1, 1e-2, 1e-3, 0.0]:
        out, _, cnt = s2o_attention_ref(q, k, v, tau=tau, block_size=64, segment_size=256, q_tile=64,
                                        stop="planned", samples=32, local_window=128)
        dens.append(_density(cnt))
        errs.append(((out - dense).norm() / dense.norm()).item())
    assert dens == sorted(dens) and dens[-1] == 1.0, f"density must grow as tau falls, to 1 at tau 0: {dens}"
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-5, f"error must fall with tau: {errs}"
    assert dens[0] < 0.8, f"tau 0.1 should leave blocks out on structured inputs: density {dens[0]}"


def test_kernel_planned_matches_reference_chunked_gqa():
    # a prefill after a cached prefix (333 rows of 900), GQA 4:1, fp32 (interpreter): the kernel's sampled-mass
    # estimate, ranking and budget are the reference's
    from sgl_slim.attention import s2o_triton
    L, Tq = 900, 333
    q, k, v = make_qkv(L, 8, 2, 64, seed=15, dtype=torch.float32)
    q = q[L - Tq:]
    kw = dict(stop="planned", samples=20, local_window=128)
    ref, ref_lse, cnt = s2o_attention_ref(q, k, v, tau=0.01, block_size=64, segment_size=256, q_tile=64, **kw)
    out, lse, comp, _ = s2o_triton.s2o_paged(
        q, k, v, qo_indptr=torch.tensor([0, Tq]), kv_indptr=torch.tensor([0, L]),
        kv_indices=torch.arange(L, dtype=torch.int32), tau=0.01, block_size=64, segment_size=256, q_tile=64,
        sm_scale=0.125, return_lse=True, **kw)
    assert comp.sum(0).tolist() == cnt["computed"].tolist(), "visited blocks differ from the reference"
    assert (out - ref).abs().max() < 1e-4 and (lse - ref_lse).abs().max() < 1e-4
    assert _density(cnt) < 1.0, "the case must leave blocks out"


def test_sampled_mass_kernel_reads_a_shuffled_pool_in_place():
    """The planned rule's estimate on the kernels (interpreter, fp32): a chunked prefill (prefix 1100 of 4100) whose
    keys sit at shuffled slots of a larger pool, a GQA group of 7 (two chunks of sampled pairs, the second added to
    the first) and the log-sum-exp split over keys (4 splits here), against ``s2o_ref.sampled_mass`` on the
    gathered keys.  Both sum fp32 products (the kernels' dots are IEEE here) in different orders: 1e-5 of the row's
    largest estimate is far above that rounding and far below any real difference."""
    from sgl_slim.attention import s2o_triton
    from sgl_slim.attention.s2o_ref import sampled_mass
    L, Tq, Hq, Hkv, D = 4100, 3000, 7, 1, 32
    q, k, _ = make_qkv(L, Hq, Hkv, D, seed=31, dtype=torch.float32)
    q = q[L - Tq:]
    pool = torch.randn(L + 500, Hkv, D)
    slots = torch.randperm(L + 500)[:L].int()
    pool[slots.long()] = k
    idx = torch.cat([torch.randint(0, L + 500, (77,), dtype=torch.int32), slots])     # the sequence at offset 77
    for reduce in ["mean", "max"]:
        want = sampled_mass(q, k, segment_size=1024, sm_scale=D ** -0.5, n_sample=20, reduce=reduce)
        got = s2o_triton.sampled_mass_triton(q, pool, segment_size=1024, sm_scale=D ** -0.5, n_sample=20,
                                             reduce=reduce, kv_indices=idx, kv_beg=77, kv_len=L)
        scale = want.amax(-1, keepdim=True).clamp(min=1e-30)
        err = ((got - want).abs() / scale).max().item()
        assert err < 1e-5, f"{reduce}: max error {err:.3g} of the row's largest estimate"
        assert want[1:].amax() > 0, "the case must hold earlier keys"


@pytest.mark.parametrize("window", [0, 100])
def test_rank_and_budget_kernels_equal_the_reference(window):
    """The ranking (sort keys from the estimate's float bits, one stable sort) and the budget (suffix sums of the
    ranked estimate) on the kernels give the reference's rank exactly and its budget on every row: the buckets are
    integers from the same bits on both sides, and the budgets' suffix sums differ by rounding only (fp32, orders
    of 1e-7 relative), which moves no count across a block boundary on these inputs.  Rows with zero estimates,
    exact ties and a budget of whole rows included; tau per KV head."""
    from sgl_slim.attention import s2o_triton
    from sgl_slim.attention.s2o_ref import planned_budget, rank_by_mass
    gen = torch.Generator().manual_seed(3)
    n_seg, Hkv, L, S = 4, 2, 2300, 512
    e = torch.rand(n_seg, Hkv, L, generator=gen) ** 6 / 300
    e[..., ::7] = 0.0
    e[..., 5::11] = e[..., 5:6]                           # ties: the stable sort keeps them in position order
    first = 1
    seg_starts = (first + torch.arange(n_seg)) * S
    e = e.masked_fill(torch.arange(L)[None, None, :] >= seg_starts[:, None, None], 0.0)
    want_rank = rank_by_mass(e, seg_starts, window)
    budgets = []
    for tau in [torch.tensor([0.05, 0.2]), torch.tensor([1e-3, 0.0])]:
        want_len = planned_budget(e, want_rank, seg_starts, tau, 64, window)
        rank, n = s2o_triton.rank_and_budget(e, first_seg=first, segment_size=S, tau_kv=tau, block_size=64,
                                             local_window=window)
        assert torch.equal(rank, want_rank), "rank differs from rank_by_mass"
        assert torch.equal(n, want_len), f"budget {n.tolist()} != {want_len.tolist()}"
        budgets.append(n)
    idx = torch.randperm(L + 40).int()                    # the rank as token slots: kv_indices[40 + position]
    slot_rank, _ = s2o_triton.rank_and_budget(e, first_seg=first, segment_size=S, tau_kv=tau, block_size=64,
                                              local_window=window, slots=(idx, 40))
    assert torch.equal(slot_rank, idx[40 + want_rank.long()]), "slots differ from kv_indices[kv_beg + rank]"
    contig, _ = s2o_triton.rank_and_budget(e, first_seg=first, segment_size=S, tau_kv=tau, block_size=64,
                                           local_window=window, slots=(None, 40))
    assert torch.equal(contig, 40 + want_rank)
    whole = torch.stack(budgets) == seg_starts[None, :, None]
    assert whole.any() and not whole.all(), "the case must hold partial and whole-row budgets"


def test_planned_index_is_a_handful_of_launches():
    """The planned index of one sequence runs as a few kernels (no chain of small torch ops: each is a launch and
    tens of microseconds of host time on a GPU): the sampled-mass kernels, the ranking kernels, one sort and the
    tensors they fill.  Counted on the CPU: torch ops that compute, and Triton launches.  Fails with the
    torch-op ranking and budget these kernels replaced."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from sgl_slim.attention import s2o_triton

    no_launch = {"view", "slice", "select", "as_strided", "_unsafe_view", "alias", "detach", "empty",
                 "empty_strided", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "lift_fresh"}

    class Count(TorchDispatchMode):
        ops: list = []
        in_kernel = False              # the interpreter's own tensor work inside a launch is not counted

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in no_launch and not Count.in_kernel:
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    launches = []
    kernel_cls = type(s2o_triton._sampled_lse)
    real_getitem = kernel_cls.__getitem__

    def counted(self, grid):
        launch = real_getitem(self, grid)

        def run(*args, **kwargs):
            launches.append(self.fn.__name__)
            Count.in_kernel = True
            try:
                return launch(*args, **kwargs)
            finally:
                Count.in_kernel = False
        return run

    L, Tq = 2600, 2600
    q, k, _ = make_qkv(L, 4, 1, 32, seed=2, dtype=torch.float32)
    tau, idx = torch.tensor([0.01]), torch.arange(L, dtype=torch.int32)
    kernel_cls.__getitem__ = counted
    try:
        with Count():
            s2o_triton.plan_by_mass(q[L - Tq:], k, kv_indices=idx, kv_beg=0, kv_len=L, segment_size=512,
                                    sm_scale=32 ** -0.5, tau_kv=tau, block_size=64, local_window=64)
    finally:
        kernel_cls.__getitem__ = real_getitem
    total = len(Count.ops) + len(launches)
    assert len(launches) == 4, f"expected 2 sampled-mass + 2 ranking kernels, got {launches}"
    assert total <= 8, f"{total} launches: torch ops {Count.ops}, kernels {launches}"


# ----------------------------------------------------------------------------------- audit (v4)
def _planted_needles(L, Hq, Hkv, D, seed):
    """make_qkv plus, per KV head, 6 needle keys that one query row each reads strongly (and no other row):
    what a segment's sampled rows miss and the audit must find."""
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=seed, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 100)
    G = Hq // Hkv
    for h in range(Hkv):
        keys = torch.randperm(L // 2, generator=gen)[:6]
        readers = L // 2 + torch.randperm(L // 2, generator=gen)[:6]
        for j, i in zip(keys.tolist(), readers.tolist()):
            u = torch.randn(D, generator=gen)
            u = u / u.norm()
            k[j, h] = 6.0 * u
            q[i, h * G:(h + 1) * G] = 6.0 * u             # logit 36 / sqrt(D) * ... : the row's dominant key
            v[j, h] = 5.0 * torch.randn(D, generator=gen)
    return q, k, v


def test_audit_finds_the_keys_the_sampled_rows_miss():
    q, k, v = _planted_needles(1536, 8, 2, 64, seed=21)
    dense, _ = dense_attention_ref(q, k, v)
    kw = dict(tau=0.05, block_size=64, segment_size=256, q_tile=64, stop="planned", samples=4, local_window=64)
    plain, _, c3 = s2o_attention_ref(q, k, v, **kw)
    audited, _, c4 = s2o_attention_ref(q, k, v, audit=True, **kw)
    e3 = ((plain - dense).norm() / dense.norm()).item()
    e4 = ((audited - dense).norm() / dense.norm()).item()
    d3, d4 = _density(c3), _density(c4)
    assert d3 <= d4 < 1.0, f"the audit only adds blocks, and not all of them: {d3:.3f} -> {d4:.3f}"
    assert e4 < 0.25 * e3, f"the audit must recover the needles: rel-L2 {e3:.4g} -> {e4:.4g}"
    out0, _, c0 = s2o_attention_ref(q, k, v, audit=True, **{**kw, "tau": 0.0})
    assert _density(c0) == 1.0 and ((out0 - dense).norm() / dense.norm()).item() < 1e-5


def test_audit_needs_the_planned_rule():
    q, k, v = make_qkv(64, 2, 1, 32, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="audit"):
        s2o_attention_ref(q, k, v, tau=0.1, block_size=16, segment_size=32, q_tile=32, stop="remaining", audit=True)


def test_fp8_audit_margin_covers_the_rounding_error():
    """fp8_audit_operands: q8 qs . k8 k8s stays within each row's margin of the exact q . k (keys with outlier
    coordinates and queries of mixed scale, as RoPE'd projections have), while a quarter of the margin does not
    cover it (the margin is a measured bound, not slack), and an e4m3 cache is read as it is."""
    from sgl_slim.attention.s2o_triton import fp8_audit_operands
    g = torch.Generator().manual_seed(3)
    q = torch.randn(512, 8, 64, generator=g) * torch.logspace(-1, 1, 64)
    k = torch.randn(2048, 2, 64, generator=g)
    k[:, :, :4] *= 20
    q, k = q.bfloat16(), k.bfloat16()
    q8, qs, k8, k8s, marg = fp8_audit_operands(q, k)
    for h in range(8):
        approx = (q8[:, h].float() * qs[:, h, None]) @ (k8[:, h // 4].float() * k8s[h // 4]).T
        err = (approx - q[:, h].float() @ k[:, h // 4].float().T).abs()
        assert (err <= marg[:, h, None]).all(), f"head {h}: error beyond the margin"
        assert (err > marg[:, h, None] / 4).any(), f"head {h}: a quarter of the margin already covers it"
    cache = k.float().to(torch.float8_e4m3fn)
    _, _, k8c, k8sc, _ = fp8_audit_operands(q, cache)
    assert k8c is cache and torch.equal(k8sc, torch.ones(2))


def _last_row_needle(q, k, v, key, g):
    """Per KV head h, key ``key + h`` holds most of the mass of the last query row, and no other row reads it."""
    Hkv, D = k.shape[1:]
    G = q.shape[1] // Hkv
    for h in range(Hkv):
        u = torch.randn(D, generator=g)
        u = u / u.norm()
        k[key + h, h], v[key + h, h] = 10.0 * u, 5.0 * torch.randn(D, generator=g)
        q[-1, h * G:(h + 1) * G] = 10.0 * u


def test_v5_audits_the_last_rows_only():
    # v5 = v3's plan + v4's audit on the tiles of the last positions: those rows get v4's output exactly, every
    # other row v3's, and a needle that only the last row reads is found
    L, Hq, Hkv, D = 1536, 8, 2, 64
    q, k, v = _planted_needles(L, Hq, Hkv, D, seed=21)
    _last_row_needle(q, k, v, 100, torch.Generator().manual_seed(5))
    dense, _ = dense_attention_ref(q, k, v)
    kw = dict(tau=0.05, block_size=64, segment_size=256, q_tile=64, stop="planned", samples=4, local_window=64)
    o3, _, c3 = s2o_attention_ref(q, k, v, **kw)
    o4, _, c4 = s2o_attention_ref(q, k, v, audit=True, **kw)
    o5, _, c5 = s2o_attention_ref(q, k, v, audit=True, audit_last=64, **kw)
    assert _density(c3) < _density(c5) < _density(c4), (_density(c3), _density(c5), _density(c4))
    assert torch.equal(o5[-64:], o4[-64:]) and torch.equal(o5[:-64], o3[:-64])
    err = lambda o: ((o[-1] - dense[-1]).norm() / dense[-1].norm()).item()  # noqa: E731
    assert err(o5) < 0.1 * err(o3), f"the last row's needle: rel-L2 {err(o3):.3g} (v3) -> {err(o5):.3g} (v5)"
    with pytest.raises(ValueError, match="audit_last"):
        s2o_attention_ref(q, k, v, audit_last=64, **kw)


def test_v5_audit_last_sets_the_audited_rows_through_the_api():
    # the public API's audit_last: v5's audit covers the tiles of the last N positions (default 128): with N the
    # whole sequence it is v4, with N = 512 the last 512 rows are v4's and the others v3's (the needle test above)
    from sgl_slim.attention import s2o_attention
    L, Hq, Hkv, D = 3072, 4, 1, 64
    q, k, v = _planted_needles(L, Hq, Hkv, D, seed=23)
    kw = dict(tau=0.05, block_size=64, segment_size=256)
    o3, s3 = s2o_attention(q, k, v, variant="v3", return_stats=True, **kw)
    o4, s4 = s2o_attention(q, k, v, variant="v4", return_stats=True, **kw)
    o5, s5 = s2o_attention(q, k, v, variant="v5", return_stats=True, **kw)
    o512, s512 = s2o_attention(q, k, v, variant="v5", audit_last=512, return_stats=True, **kw)
    oall = s2o_attention(q, k, v, variant="v5", audit_last=L, **kw)
    assert torch.equal(oall, o4)
    assert torch.equal(o512[-512:], o4[-512:]) and torch.equal(o512[:-512], o3[:-512])
    assert torch.equal(o5[-128:], o4[-128:]) and torch.equal(o5[:-128], o3[:-128])
    assert s3["density"] < s5["density"] < s512["density"] < s4["density"], (s3, s5, s512, s4)
    for variant, last, match in (("v4", 512, "v5"), ("v5", 0, ">= 1"), ("v5", 1.5, ">= 1"), ("v5", True, ">= 1")):
        with pytest.raises(ValueError, match=match):
            s2o_attention(q, k, v, variant=variant, audit_last=last, **kw)


def test_audit_form_is_checked_and_is_the_kernels_business():
    # how the GPU kernel runs the audit (fused / split) changes no semantics: the reference answers the same for
    # both forms (the kernel's forms are compared in test_s2o_kernel_interp / test_s2o_gpu), and refuses others
    from sgl_slim.attention import s2o_attention
    q, k, v = _planted_needles(1024, 4, 1, 64, seed=29)
    kw = dict(tau=0.05, block_size=64, segment_size=256, variant="v4")
    assert torch.equal(s2o_attention(q, k, v, audit_form="split", **kw), s2o_attention(q, k, v, **kw))
    with pytest.raises(ValueError, match="audit_form must be one of"):
        s2o_attention(q, k, v, audit_form="sideways", **kw)


def test_each_audited_variant_defaults_to_its_faster_audit_form():
    # measured on the H200 (benchmarks/s2o.md): split for v4 (every tile audits), fused for v5 (the last rows only)
    from sgl_slim.attention import _audit_split
    assert _audit_split(None, "v4") and not _audit_split(None, "v5") and not _audit_split(None, "v3")
    assert not _audit_split("fused", "v4") and _audit_split("split", "v5")


@pytest.mark.parametrize("block,fp8,last", [(64, False, 0), (16, False, 0), (64, True, 0), (16, True, 0),
                                            (64, False, 100), (16, True, 100)])
def test_kernel_audit_matches_reference_chunked_gqa(block, fp8, last):
    # block 16: up to 64 audited blocks per segment, so the kernel's 32-block hit words wrap; fp8: the audit's
    # fp8 pre-filter, whose listed blocks are tested again exactly, must visit the exact audit's blocks
    from sgl_slim.attention import s2o_triton
    L, Tq = 1100, 500
    q, k, v = _planted_needles(L, 8, 2, 64, seed=22)
    q = q[L - Tq:]
    kw = dict(stop="planned", samples=4, local_window=64, audit=True, audit_last=last)
    ref, ref_lse, cnt = s2o_attention_ref(q, k, v, tau=0.05, block_size=block, segment_size=256, q_tile=64, **kw)
    out, lse, comp, _ = s2o_triton.s2o_paged(
        q, k, v, qo_indptr=torch.tensor([0, Tq]), kv_indptr=torch.tensor([0, L]),
        kv_indices=torch.arange(L, dtype=torch.int32), tau=0.05, block_size=block, segment_size=256, q_tile=64,
        sm_scale=0.125, return_lse=True, audit_fp8=fp8, **kw)
    assert comp.sum(0).tolist() == cnt["computed"].tolist(), "visited blocks differ from the reference"
    assert (out - ref).abs().max() < 1e-4 and (lse - ref_lse).abs().max() < 1e-4
    plain, _, c3 = s2o_attention_ref(q, k, v, tau=0.05, block_size=block, segment_size=256, q_tile=64,
                                     **{**kw, "audit": False, "audit_last": 0})
    assert (cnt["computed"] > c3["computed"]).any(), "the case must make the audit add blocks"


def _paged_needles(lens, qlens, Hq, Hkv, D, *, seed, g, spare, last_row_needle=False):
    """Planted-needle sequences of lengths ``lens`` in one shuffled slot pool (``spare`` slots unused): each
    sequence's last ``qlens`` queries, its K/V, the pools and the slots in position order."""
    qs, ks, vs = [], [], []
    for i, L in enumerate(lens):
        q, k, v = _planted_needles(L, Hq, Hkv, D, seed=seed + i)
        if last_row_needle:
            _last_row_needle(q, k, v, 40, g)
        qs.append(q[L - qlens[i]:])
        ks.append(k)
        vs.append(v)
    slots = torch.randperm(sum(lens) + spare, generator=g)[:sum(lens)].to(torch.int32)
    k_pool = torch.zeros(sum(lens) + spare, Hkv, D)
    v_pool = torch.zeros_like(k_pool)
    k_pool[slots.long()], v_pool[slots.long()] = torch.cat(ks), torch.cat(vs)
    return qs, ks, vs, k_pool, v_pool, slots


@pytest.mark.parametrize("heads,audit_n,fp8,last", [(1, 64, False, 0), (2, 32, False, 100), (4, 16, False, 0),
                                                   (2, 64, True, 0)])
def test_split_audit_equals_the_fused_audit(heads, audit_n, fp8, last):
    # the audit as kernels of its own (the q heads of a group per program, a block scored in parts) lists the
    # fused audit's hits: the same visited blocks, the same output up to fp32 rounding, also in a paged batch
    # (two sequences, one with a cached prefix, shuffled slots), on an fp8 cache with its scales, and for v5
    # (the last rows' tiles only)
    from sgl_slim.attention import s2o_triton
    Hq, Hkv, D, block, seg = 8, 2, 64, 64, 256
    lens, qlens = [1100, 700], [500, 700]
    qs, _, _, k_pool, v_pool, slots = _paged_needles(lens, qlens, Hq, Hkv, D, seed=40, spare=30,
                                                     g=torch.Generator().manual_seed(5))
    q = torch.cat(qs)
    scales = {}
    if fp8:
        q = q.to(torch.bfloat16)
        k_pool, v_pool, _, _ = _fp8_cache(k_pool, v_pool, 0.5, 2.0)
        scales = {"k_scale": 0.5, "v_scale": 2.0}
    kw = dict(qo_indptr=torch.tensor([0, qlens[0], sum(qlens)]), kv_indptr=torch.tensor([0, lens[0], sum(lens)]),
              kv_indices=slots, tau=0.05, block_size=block, segment_size=seg, q_tile=64, sm_scale=D ** -0.5,
              stop="planned", samples=4, local_window=block, audit=True, audit_last=last, **scales)
    fused, fused_lse, c_fused, _ = s2o_triton.s2o_paged(q, k_pool, v_pool, return_lse=True, audit_split=False, **kw)
    split, split_lse, c_split, _ = s2o_triton.s2o_paged(q, k_pool, v_pool, return_lse=True, audit_split=True,
                                                        audit_heads=heads, audit_n=audit_n, **kw)
    plain, _, c_plan, _ = s2o_triton.s2o_paged(q, k_pool, v_pool, **{**kw, "audit": False, "audit_last": 0})
    assert (c_fused > c_plan).any(), "the case must make the audit add blocks"
    assert torch.equal(c_split, c_fused), "the split audit visits other blocks than the fused one"
    # fp32 products: the merged state differs from the fused one by fp32 rounding.  With an fp8 cache the products
    # run in fp16: the hits' probabilities are rounded to fp16 (2^-11) at another scale in each form, which moves an
    # output by at most 2^-11 of the largest |V|, and the bf16 output adds one unit in the last place (2^-7 of it)
    diff = (split.float() - fused.float()).abs()
    bound = 1e-5 if not fp8 else 2.0 ** -7 * fused.float().abs() + 2.0 ** -11 * (v_pool.float() * 2.0).abs().max()
    assert (diff <= bound).all() and (split_lse - fused_lse).abs().max() < 1e-5
    alone = s2o_triton.s2o_paged(q, k_pool, v_pool, audit_split=True, audit_heads=heads, audit_n=audit_n, **kw)[0]
    assert torch.equal(alone, split), "return_lse must not change the output"
    with pytest.raises(ValueError, match="audit_fp8"):
        s2o_triton.s2o_paged(q, k_pool, v_pool, audit_split=True, audit_fp8=True, **kw)
    with pytest.raises(ValueError, match="audit_n must be a power of two"):
        s2o_triton.s2o_paged(q, k_pool, v_pool, audit_split=True, audit_n=48, **kw)


def test_kernel_v5_audits_each_sequences_last_rows_in_a_paged_batch():
    # two sequences in one launch (one with a cached prefix), K/V at shuffled pool slots: the kernel audits the
    # last tiles of EACH sequence, as the reference does per sequence, and only those
    from sgl_slim.attention import VARIANTS, s2o_triton
    Hq, Hkv, D, block, seg = 8, 2, 64, 16, 64
    lens, qlens = [700, 520], [420, 520]
    qs, ks, vs, k_pool, v_pool, slots = _paged_needles(lens, qlens, Hq, Hkv, D, seed=30,
                                                       g=torch.Generator().manual_seed(8), last_row_needle=True,
                                                       spare=50)
    qo, kvp = [0, qlens[0], sum(qlens)], [0, lens[0], sum(lens)]
    counts = {}
    for name in ("v3", "v4", "v5"):
        settings = {**VARIANTS[name], "local_window": block, "samples": 4}
        out, _, comp, _ = s2o_triton.s2o_paged(
            torch.cat(qs), k_pool, v_pool, qo_indptr=torch.tensor(qo), kv_indptr=torch.tensor(kvp),
            kv_indices=slots, tau=0.05, block_size=block, segment_size=seg, q_tile=seg, sm_scale=D ** -0.5,
            **settings)
        counts[name] = comp.sum(1).tolist()
        if name != "v5":
            continue
        for b in range(2):
            ref, _, cnt = s2o_attention_ref(qs[b], ks[b], vs[b], tau=0.05, block_size=block, segment_size=seg,
                                            q_tile=seg, **settings)
            assert comp[b].tolist() == cnt["computed"].tolist(), f"sequence {b}: visited blocks differ"
            assert (out[qo[b]:qo[b + 1]] - ref).abs().max() < 1e-4
    for b in range(2):
        assert counts["v3"][b] < counts["v5"][b] < counts["v4"][b], (b, counts)
