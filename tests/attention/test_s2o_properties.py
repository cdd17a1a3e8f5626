"""Property tests (hypothesis) for S2O's public entry points on the CPU (the fp32 reference path) and the Triton
kernel (TRITON_INTERPRET=1, set below before triton is imported) with degenerate finite inputs: zeros, identical
tokens, one huge value, lengths 1 and non-multiples of the block, GQA. The documented contract: out has q's shape
and is finite; at tau 0 it equals dense attention; never more blocks visited than causal."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sgl_slim.attention import VARIANTS, dense_attention_ref, s2o_attention, s2o_attention_paged, s2o_attention_ref

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("normal", "zeros", "identical", "one_huge_q", "one_huge_k", "one_huge_v", "tiny")
BLOCK = 16


@st.composite
def cases(draw, head_dims=(4, 8)):
    length = draw(st.sampled_from([1, 2, 15, 16, 17, 33, draw(st.integers(1, 48))]))
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 1), (4, 2)]))
    d = draw(st.sampled_from(head_dims))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    q, k, v = (torch.randn(length, h, d, generator=gen) for h in (hq, hkv, hkv))
    kind = draw(st.sampled_from(KINDS))
    if kind == "zeros":
        q, k, v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    elif kind == "identical":
        q, k, v = (t[:1].expand_as(t).clone() for t in (q, k, v))
    elif kind == "tiny":
        q, k, v = q * 1e-30, k * 1e-30, v * 1e-30
    elif kind.startswith("one_huge"):
        t = {"q": q, "k": k, "v": v}[kind[-1]]
        t[draw(st.integers(0, length - 1)), 0, draw(st.integers(0, d - 1))] = 1e4 if kind != "one_huge_v" else 1e30
    tau = draw(st.sampled_from([0.0, 1e-5, 1e-2, 0.5]))
    segment = draw(st.sampled_from([BLOCK, 2 * BLOCK]))
    return q, k, v, tau, segment


def _dense(q, k, v):
    return dense_attention_ref(q, k, v)[0]


def _close_to_dense(out, q, k, v):
    ref = _dense(q, k, v)
    # fp32 both ways, different summation order: relative error of a few ulps of the largest |v|
    tol = 1e-5 * max(1.0, float(v.abs().max()))
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=tol)


@SETTINGS
@given(cases())
def test_s2o_attention_shape_finite_and_dense_at_tau0(case):
    q, k, v, tau, segment = case
    out = s2o_attention(q, k, v, tau=tau, block_size=BLOCK, segment_size=segment)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(torch.isfinite(out).all()), "finite input gave non-finite output"
    if tau == 0:
        _close_to_dense(out, q, k, v)


@SETTINGS
@given(cases(), st.sampled_from(sorted(VARIANTS)))
def test_reference_shape_finite_and_dense_at_tau0(case, variant):
    q, k, v, tau, segment = case
    settings_ = {**VARIANTS[variant], "local_window": min(VARIANTS[variant]["local_window"], BLOCK)}
    out, lse, counts = s2o_attention_ref(q, k, v, tau=tau, block_size=BLOCK, segment_size=segment, q_tile=segment,
                                         **settings_)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    assert bool((counts["computed"] <= counts["causal"]).all())
    if tau == 0:
        _close_to_dense(out, q, k, v)


@SETTINGS
@given(cases(), cases())
def test_paged_batch_of_two_equals_each_alone(a, b):
    """Two degenerate sequences in one paged call (b's K/V stored first, then a's) give each one's own output."""
    (qa, ka, va, tau, segment), (qb, kb, vb, _, _) = a, b
    if qa.shape[1:] != qb.shape[1:] or ka.shape[1:] != kb.shape[1:]:
        qb, kb, vb = qa[:1].clone(), ka[:1].clone(), va[:1].clone()            # same head layout for the pool
    k_pool, v_pool = torch.cat([kb, ka]), torch.cat([vb, va])
    la, lb = ka.shape[0], kb.shape[0]
    kv_indices = torch.cat([torch.arange(lb, lb + la), torch.arange(lb)]).to(torch.int32)
    out = s2o_attention_paged(torch.cat([qa, qb]), k_pool, v_pool,
                              qo_indptr=torch.tensor([0, la, la + lb], dtype=torch.int32),
                              kv_indptr=torch.tensor([0, la, la + lb], dtype=torch.int32), kv_indices=kv_indices,
                              tau=tau, block_size=BLOCK, segment_size=segment)
    assert out.shape == (la + lb,) + qa.shape[1:] and bool(torch.isfinite(out).all())
    alone_a = s2o_attention(qa, ka, va, tau=tau, block_size=BLOCK, segment_size=segment)
    alone_b = s2o_attention(qb, kb, vb, tau=tau, block_size=BLOCK, segment_size=segment)
    torch.testing.assert_close(out[:la], alone_a, rtol=1e-5, atol=1e-5 * max(1.0, float(va.abs().max())))
    torch.testing.assert_close(out[la:], alone_b, rtol=1e-5, atol=1e-5 * max(1.0, float(vb.abs().max())))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(head_dims=(64,)), st.sampled_from(sorted(VARIANTS)))
def test_kernel_under_the_interpreter_shape_finite_counts(case, variant):
    """The Triton kernel (interpreter, fp32) on the same degenerate inputs, with either variant's settings."""
    from sgl_slim.attention import s2o_triton
    q, k, v, tau, segment = case
    n = q.shape[0]
    ind = torch.tensor([0, n], dtype=torch.int32)
    out, lse, computed, causal = s2o_triton.s2o_paged(
        q, k, v, qo_indptr=ind, kv_indptr=ind, kv_indices=torch.arange(n, dtype=torch.int32), tau=tau,
        block_size=BLOCK, segment_size=segment, q_tile=segment, sm_scale=q.shape[2] ** -0.5, return_lse=True,
        kv_contiguous=True, **{**VARIANTS[variant], "local_window": min(VARIANTS[variant]["local_window"], BLOCK)})
    assert out.shape == q.shape and bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    assert bool((computed <= causal).all()) and bool((computed > 0).all())
    if tau == 0:
        _close_to_dense(out, q, k, v)
