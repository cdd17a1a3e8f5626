"""sgl_slim's pure-torch stand-ins for SGLang's CPU ops, each against its definition (SGLang's Triton kernel)."""

import torch

from sgl_slim.standins import cpu_ops


def setup_module():
    cpu_ops.register()


def test_register_is_idempotent_and_leaves_amx_probes_undefined():
    assert cpu_ops.register() == []  # second call adds nothing, raises nothing
    for name in cpu_ops._OPS:
        assert hasattr(torch.ops.sgl_kernel, name), name
    for probe in cpu_ops.AMX_PROBES:
        assert not hasattr(torch.ops.sgl_kernel, probe), f"{probe} must stay undefined (SGLang probes it)"


def test_assign_req_to_token_pool():
    req_to_token = torch.full((4, 10), -1, dtype=torch.int32)
    req_pool_indices = torch.tensor([2, 0])
    start, end = torch.tensor([3, 0]), torch.tensor([6, 2])
    out_cache_loc = torch.tensor([100, 101, 102, 200, 201])
    torch.ops.sgl_kernel.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, 10)
    expected = torch.full((4, 10), -1, dtype=torch.int32)
    expected[2, 3:6] = torch.tensor([100, 101, 102], dtype=torch.int32)
    expected[0, 0:2] = torch.tensor([200, 201], dtype=torch.int32)
    assert torch.equal(req_to_token, expected)


def test_copy_all_layer_kv_cache_reads_all_sources_before_writing():
    k = torch.arange(6 * 4, dtype=torch.float32).view(6, 4).clone()
    v = torch.arange(6 * 2, dtype=torch.bfloat16).view(6, 2).clone()
    k0, v0 = k.clone(), v.clone()
    ptrs = torch.tensor([k.data_ptr(), v.data_ptr()], dtype=torch.int64)
    strides = torch.tensor([k.stride(0) * k.element_size(), v.stride(0) * v.element_size()], dtype=torch.int64)
    # a swap of rows 1 and 4 plus a move 2 -> 5: overlapping sources and targets
    tgt, src = torch.tensor([1, 4, 5]), torch.tensor([4, 1, 2])
    torch.ops.sgl_kernel.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for buf, orig in ((k, k0), (v, v0)):
        expected = orig.clone()
        expected[tgt] = orig[src]
        assert torch.equal(buf, expected)


def test_fused_sigmoid_mul_in_place():
    x, gate = torch.randn(3, 8), torch.randn(3, 8)
    expected = x * torch.sigmoid(gate)
    torch.ops.sgl_kernel.fused_sigmoid_mul_cpu(x, gate)
    torch.testing.assert_close(x, expected)


def _gemma_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 + w)


def test_fused_qk_gemma_rmsnorm():
    torch.manual_seed(0)
    q, k = torch.randn(5, 4 * 16), torch.randn(5, 2 * 16)
    qw, kw = torch.randn(16), torch.randn(16)
    qo, ko = torch.ops.sgl_kernel.fused_qk_gemma_rmsnorm_cpu(q, k, qw, kw, 1e-6, 16)
    torch.testing.assert_close(qo, _gemma_norm(q.view(-1, 16), qw, 1e-6))
    torch.testing.assert_close(ko, _gemma_norm(k.view(-1, 16), kw, 1e-6))


def test_fused_qk_gemma_rmsnorm_with_gate_splits_interleaved_heads():
    torch.manual_seed(1)
    seq, heads, hd = 3, 2, 8
    q, gate = torch.randn(seq, heads, hd), torch.randn(seq, heads, hd)
    q_gate = torch.cat([q, gate], dim=-1).reshape(seq, heads * 2 * hd)  # [q_h0, g_h0, q_h1, g_h1]
    k, qw, kw = torch.randn(seq, hd), torch.randn(hd), torch.randn(hd)
    qo, ko, go = torch.ops.sgl_kernel.fused_qk_gemma_rmsnorm_with_gate_cpu(q_gate, k, qw, kw, 1e-6, hd, heads)
    torch.testing.assert_close(qo, _gemma_norm(q.reshape(-1, hd), qw, 1e-6))
    torch.testing.assert_close(ko, _gemma_norm(k, kw, 1e-6))
    assert torch.equal(go, gate.reshape(-1, hd))


def test_unsupported_op_says_what_is_unsupported():
    import pytest
    with pytest.raises(NotImplementedError, match="not supported on the CPU"):
        torch.ops.sgl_kernel.fused_qkvzba_split_reshape_cat_contiguous_cpu(
            torch.zeros(1, 4), torch.zeros(1, 2), 1, 1, 2, 2)
