"""S2O kernel on the GPU at real shapes, against the fp32 reference (flash-attention error budget:
the kernel's error vs fp32 must be at most ~2x PyTorch SDPA's own error in the same dtype)."""

import math

import pytest
import torch

from sgl_slim.attention import dense_attention_ref, s2o_attention, s2o_attention_paged
from sgl_slim.attention.inputs import make_qkv
from sgl_slim.attention.s2o_ref import rank_keys, s2o_attention_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _sdpa_err(q, k, v, ref):
    G = q.shape[1] // k.shape[1]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.repeat_interleave(G, 1).transpose(0, 1)[None],
        v.repeat_interleave(G, 1).transpose(0, 1)[None], is_causal=True)[0].transpose(0, 1)
    return (o.float() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,Hq,Hkv", [(128, 32, 8), (64, 10, 2)])
def test_tau0_matches_fp32_within_sdpa_budget(dtype, D, Hq, Hkv):
    L = 4099
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=3, dtype=dtype, device="cuda")
    ref, _ = dense_attention_ref(q, k, v)
    out, stats = s2o_attention(q, k, v, tau=0.0, return_stats=True)
    err = (out.float() - ref).abs().max().item()
    budget = 2 * _sdpa_err(q, k, v, ref) + 1e-5
    assert stats["density"] == 1.0, f"tau=0 must visit every block, density {stats['density']}"
    assert err <= budget, f"{dtype} D={D}: kernel max error {err:.3g} > 2x SDPA error budget {budget:.3g}"


@pytest.mark.parametrize("tau", [1e-3, 1e-2])
def test_tau_positive_matches_reference_with_same_rank(tau):
    L, Hq, Hkv, D = 4096, 32, 8, 128
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=4, dtype=torch.bfloat16, device="cuda")
    rank = rank_keys(q, k, segment_size=512, sm_scale=D ** -0.5)
    ref, _, cnt = s2o_attention_ref(q, k, v, tau=tau, block_size=64, segment_size=512, stop="block", rank=rank)
    dense, _ = dense_attention_ref(q, k, v)
    out, stats = s2o_attention(q, k, v, tau=tau, block_size=64, segment_size=512, variant="v1",
                               return_stats=True)
    ref_density = (cnt["computed"].sum() / cnt["causal"].sum()).item()
    assert abs(stats["density"] - ref_density) < 0.02, f"density {stats['density']} vs reference {ref_density}"
    e_ker = ((out.float() - dense).norm() / dense.norm()).item()
    e_ref = ((ref - dense).norm() / dense.norm()).item()
    assert e_ker <= 1.5 * e_ref + 1e-2, f"kernel rel-L2 {e_ker:.3g} vs reference {e_ref:.3g}"


def test_varlen_prefix_pool_lse():
    torch.manual_seed(0)
    Hq, Hkv, D = 16, 4, 128
    lens = [(3000, 1000), (1500, 1500), (700, 1)]      # (kv_len, q_len)
    n_slots = sum(kv for kv, _ in lens) + 500
    k_pool = torch.randn(n_slots, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v_pool = torch.randn_like(k_pool)
    perm = torch.randperm(n_slots, device="cuda").int()
    qs, kv_idx, qo, kvp = [], [], [0], [0]
    off = 0
    for kv, ql in lens:
        kv_idx.append(perm[off:off + kv])
        off += kv
        qs.append(torch.randn(ql, Hq, D, device="cuda", dtype=torch.bfloat16))
        qo.append(qo[-1] + ql)
        kvp.append(kvp[-1] + kv)
    q = torch.cat(qs)
    kw = dict(qo_indptr=torch.tensor(qo, device="cuda"), kv_indptr=torch.tensor(kvp, device="cuda"),
              kv_indices=torch.cat(kv_idx), block_size=64, segment_size=512)
    out2, stats2 = s2o_attention_paged(q, k_pool, v_pool, tau=1e-2, return_stats=True, **kw)
    assert torch.isfinite(out2.float()).all() and 0 < stats2["density"] <= 1.0, "v2 on a paged varlen batch"
    out, lse, stats = s2o_attention_paged(q, k_pool, v_pool, tau=0.0, return_lse=True, return_stats=True, **kw)
    for b, (kv, ql) in enumerate(lens):
        slots = kv_idx[b].long()
        ref, ref_lse = dense_attention_ref(qs[b], k_pool[slots], v_pool[slots])
        err = (out[qo[b]:qo[b + 1]].float() - ref).abs().max().item()
        assert err < 2e-2, f"sequence {b}: max error {err}"
        lerr = (lse[qo[b]:qo[b + 1]] - ref_lse).abs().max().item()
        assert lerr < 1e-2, f"sequence {b}: lse error {lerr}"
    assert stats["density_per_seq"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("settings", [
    {"stop": "block"},
    {"stop": "remaining", "compensate": True},
    {"stop": "remaining", "compensate": True, "tail_estimate": "estimate"},
    {"stop": "remaining", "compensate": True, "local_window": 1024},
    {"stop": "planned"},
    {"stop": "planned", "mass_reduce": "max", "local_window": 1024},
    {"stop": "planned", "local_window": 1024, "audit": True},
    {"stop": "planned", "local_window": 1024, "audit": True, "audit_last": 128},
])
def test_stop_rules_match_reference_at_real_shape(settings):
    """The kernel's early stop is the reference's: with the same rank the visited blocks agree (the stop test
    compares bf16-rounded block masses, so a near-tie may flip: at most 2% of the (tile, head) decisions move
    the density) and the error vs fp32 dense stays within the reference's."""
    from sgl_slim.attention import s2o_triton
    L, Hq, Hkv, D = 8192, 32, 8, 128
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=5, dtype=torch.bfloat16, device="cuda")
    dense, _ = dense_attention_ref(q, k, v)
    tau = torch.tensor([1e-2, 3e-2, 1e-1, 1e-2, 3e-3, 1e-2, 3e-2, 1e-2], device="cuda")
    ref, _, cnt = s2o_attention_ref(q, k, v, tau=tau, block_size=128, segment_size=2048, **settings)
    ind = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    out, _, comp, caus = s2o_triton.s2o_paged(
        q, k, v, qo_indptr=ind, kv_indptr=ind, kv_indices=torch.arange(L, dtype=torch.int32, device="cuda"),
        tau=tau, block_size=128, segment_size=2048, q_tile=128, sm_scale=D ** -0.5, kv_contiguous=True,
        **settings)
    d_ref = (cnt["computed"].sum() / cnt["causal"].sum()).item()
    d_ker = (comp.sum() / caus.sum()).item()
    assert abs(d_ker - d_ref) < 0.02, f"{settings}: density {d_ker:.4f} vs reference {d_ref:.4f}"
    e_ker = ((out.float() - dense).norm() / dense.norm()).item()
    e_ref = ((ref - dense).norm() / dense.norm()).item()
    assert e_ker <= 1.2 * e_ref + 5e-3, f"{settings}: kernel rel-L2 {e_ker:.4g} vs reference {e_ref:.4g}"


@pytest.mark.parametrize("fp8_cache", [False, True])
def test_split_audit_visits_the_fused_audits_blocks(fp8_cache):
    """v4's audit as kernels of its own against the audit inside the attention kernel, at the
    Llama-3.1-8B shape on a chunk with a cached prefix at shuffled slots: the same blocks visited, the output
    equal up to the merge's rounding: the two fp32 results round to bf16 outputs at most one unit in the last place
    apart (2^-8 of a value), so their rel-L2 is below 2^-8 even if every element moved."""
    from sgl_slim.attention import VARIANTS, s2o_triton
    L, Tq, Hq, Hkv, D = 8192, 3000, 32, 8, 128
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=6, dtype=torch.bfloat16, device="cuda")
    q = q[L - Tq:].contiguous()
    slots = torch.randperm(L + 100, device="cuda")[:L].int()
    k_pool = torch.zeros(L + 100, Hkv, D, dtype=k.dtype, device="cuda")
    v_pool = torch.zeros_like(k_pool)
    k_pool[slots.long()], v_pool[slots.long()] = k, v
    scales = {}
    if fp8_cache:
        k_pool, v_pool = (k_pool.float() / 0.5).to(torch.float8_e4m3fn), (v_pool.float() / 0.25).to(torch.float8_e4m3fn)
        scales = {"k_scale": 0.5, "v_scale": 0.25}
    kw = dict(qo_indptr=torch.tensor([0, Tq], device="cuda"), kv_indptr=torch.tensor([0, L], device="cuda"),
              kv_indices=slots, block_size=128, segment_size=2048, q_tile=128, sm_scale=D ** -0.5, return_lse=True,
              **VARIANTS["v4"], **scales)
    for tau in (3e-2, 3e-3):
        fused, f_lse, c_fused, _ = s2o_triton.s2o_paged(q, k_pool, v_pool, tau=tau, audit_split=False, **kw)
        split, s_lse, c_split, _ = s2o_triton.s2o_paged(q, k_pool, v_pool, tau=tau, audit_split=True, **kw)
        assert torch.equal(c_split, c_fused), f"tau {tau}: {(c_split - c_fused).abs().sum().item()} blocks differ"
        err = ((split.float() - fused.float()).norm() / fused.float().norm()).item()
        assert err < 2.0 ** -8 and (s_lse - f_lse).abs().max().item() < 1e-4, f"tau {tau}: split vs fused {err:.3g}"


@pytest.mark.parametrize("fp8_cache", [False, True])
def test_fp8_audit_visits_the_exact_audits_blocks(fp8_cache):
    """v4's audit with its fp8 pre-filter: the listed blocks are tested again exactly, so the kernel visits the
    exact audit's blocks (a miss would need an fp8 rounding error beyond the row's margin) and gives the same
    output up to summation order; over an fp8 KV cache the pre-filter reads the cache itself."""
    from sgl_slim.attention import s2o_triton
    L, Hq, Hkv, D = 8192, 32, 8, 128
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=5, dtype=torch.bfloat16, device="cuda")
    scales = {}
    if fp8_cache:
        k, v = (k.float() / 0.5).to(torch.float8_e4m3fn), (v.float() / 0.25).to(torch.float8_e4m3fn)
        scales = {"k_scale": 0.5, "v_scale": 0.25}
    ind = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    kw = dict(qo_indptr=ind, kv_indptr=ind, kv_indices=torch.arange(L, dtype=torch.int32, device="cuda"),
              block_size=128, segment_size=2048, q_tile=128, sm_scale=D ** -0.5, kv_contiguous=True,
              stop="planned", local_window=1024, audit=True, **scales)
    for tau in (3e-2, 3e-3):
        exact, _, c_exact, _ = s2o_triton.s2o_paged(q, k, v, tau=tau, **kw)
        fast, _, c_fast, _ = s2o_triton.s2o_paged(q, k, v, tau=tau, audit_fp8=True, **kw)
        assert torch.equal(c_fast, c_exact), f"tau {tau}: {(c_fast - c_exact).abs().sum().item()} blocks differ"
        err = ((fast.float() - exact.float()).norm() / exact.float().norm()).item()
        assert err < 1e-3, f"tau {tau}: fp8-filtered audit vs exact audit rel-L2 {err:.3g}"


@pytest.mark.parametrize("tau", [0.0, 1e-3])
def test_fp8_kv_kernel_equals_its_dequantised_values(tau):
    # fp8 K/V with power-of-two scales: the kernel folds k_scale into the logit scale and v_scale into the
    # output, and runs its products in fp16 (every e4m3 value and this bf16 q are exact there, and fp16 rounds
    # the probabilities 4x finer than bf16); the bf16 pool holding the dequantised values runs them in bf16.
    # Same blocks, and against exact fp32 attention of those values the fp8 pool's error is at most the bf16
    # pool's (+5% for summation order)
    L, Hq, Hkv, D = 8192, 32, 8, 128
    q, k, v = make_qkv(L, Hq, Hkv, D, seed=9, dtype=torch.bfloat16, device="cuda")
    k8, v8 = (k.float() / 0.5).to(torch.float8_e4m3fn), (v.float() / 0.25).to(torch.float8_e4m3fn)
    kd, vd = (k8.float() * 0.5).bfloat16(), (v8.float() * 0.25).bfloat16()
    ind = torch.tensor([0, L], device="cuda", dtype=torch.int32)
    idx = torch.arange(L, device="cuda", dtype=torch.int32)
    kw = dict(qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=tau, return_stats=True)
    o8, s8 = s2o_attention_paged(q, k8, v8, k_scale=0.5, v_scale=0.25, **kw)
    ob, sb = s2o_attention_paged(q, kd, vd, **kw)
    assert s8["density_per_head"] == sb["density_per_head"], "fp8 and dequantised pools visit different blocks"
    exact, _ = dense_attention_ref(q, kd, vd)
    e8, eb = (((o.float() - exact).norm() / exact.norm()).item() for o in (o8, ob))
    assert e8 <= 1.05 * eb, f"tau {tau}: fp8 pool rel-L2 {e8:.3g} vs the bf16 pool's {eb:.3g}"
    if tau == 0.0:
        assert e8 < 3e-3, f"fp8 pool dense rel-L2 {e8:.3g}: beyond bf16 output rounding"


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_sampled_mass_kernel_matches_reference_at_real_shape(reduce):
    """The planned rule's estimate: the Triton kernels against the fp32 reference on the same bf16 inputs.  Products
    of bf16 values are exact in the kernels' fp32 accumulators, so the two differ only by summation order and
    exp2 vs exp: logits of tens of nats to ~1e-5, a probability to ~1e-5 relative, its mean over rows likewise;
    1e-3 of the row's largest estimate leaves two decades for the long log-sum-exp sums.  A chunked prefill
    (prefix 3000) and a GQA group of 7 (two chunks of sampled rows) included."""
    from sgl_slim.attention import s2o_triton
    from sgl_slim.attention.s2o_ref import sampled_mass
    for L, Tq, Hq, Hkv in [(8192, 8192, 32, 8), (9000, 6000, 28, 4)]:
        q, k, _ = make_qkv(L, Hq, Hkv, 128, seed=11, dtype=torch.bfloat16, device="cuda")
        q = q[L - Tq:]
        want = sampled_mass(q, k, segment_size=2048, sm_scale=128 ** -0.5, reduce=reduce)
        got = s2o_triton.sampled_mass_triton(q, k, segment_size=2048, sm_scale=128 ** -0.5, reduce=reduce)
        scale = want.amax(-1, keepdim=True).clamp(min=1e-30)
        err = ((got - want).abs() / scale).max().item()
        assert err < 1e-3, f"L={L} Tq={Tq} {reduce}: max error {err:.3g} of the row's largest estimate"


def test_planned_index_kernels_match_the_reference_at_real_shape():
    """The planned index on the kernels at the Llama-3.1-8B attention shape (32K, a prefill after a 4K prefix, keys
    at shuffled slots of a larger pool): the estimate within the sampled-mass test's 1e-3, then, on that same
    estimate, the rank equal to ``rank_by_mass`` and the budget to ``planned_budget``.  The budgets' fp32 suffix
    sums run in different orders (a GPU scan against the kernel's blocks), so a row may differ by one block where
    the ref's dropped mass at the boundary is within 1e-4 of tau (rounding of sums of ~1e4 terms: ~1e-6)."""
    from sgl_slim.attention import s2o_triton
    from sgl_slim.attention.s2o_ref import planned_budget, rank_by_mass, sampled_mass
    L, Tq, S = 32768, 28672, 2048
    q, k, _ = make_qkv(L, 32, 8, 128, seed=12, dtype=torch.bfloat16, device="cuda")
    q = q[L - Tq:]
    pool = torch.randn(L + 1000, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(L + 1000, device="cuda")[:L]
    pool[slots] = k
    want = sampled_mass(q, k, segment_size=S, sm_scale=128 ** -0.5)
    got = s2o_triton.sampled_mass_triton(q, pool, segment_size=S, sm_scale=128 ** -0.5,
                                         kv_indices=slots.int(), kv_beg=0, kv_len=L)
    err = ((got - want).abs() / want.amax(-1, keepdim=True).clamp(min=1e-30)).max().item()
    assert err < 1e-3, f"estimate through the pool: max error {err:.3g} of the row's largest estimate"
    first = (L - Tq) // S
    seg_starts = (first + torch.arange(got.shape[0], device="cuda")) * S
    tau = torch.tensor([1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.0, 1e-2, 1e-2], device="cuda")
    rank, n = s2o_triton.rank_and_budget(got, first_seg=first, segment_size=S, tau_kv=tau, block_size=128,
                                         local_window=1024)
    want_rank = rank_by_mass(got, seg_starts, 1024)
    assert torch.equal(rank, want_rank), "rank differs from rank_by_mass on the same estimate"
    want_n = planned_budget(got, want_rank, seg_starts, tau, 128, 1024)
    for s, h in (n != want_n).nonzero().tolist():
        lo = int(min(n[s, h], want_n[s, h]))
        dropped = got[s, h][want_rank[s, h, lo:int(seg_starts[s])].long()].sum().item()
        assert abs(int(n[s, h]) - int(want_n[s, h])) == 128 and abs(dropped - tau[h].item()) < 1e-4 * tau[h].item(), \
            f"segment {s} head {h}: budget {int(n[s, h])} vs {int(want_n[s, h])}, dropped {dropped:.6g}"
    assert (want_n < seg_starts[:, None]).float().mean() > 0.5, "the case must leave keys out"
