"""sgl_slim's plain-torch stand-ins for sgl_kernel's CUDA ops (GPU stand-in mode), each against its definition
written out plainly here in fp64 (run on the CPU: the ops are device-agnostic torch)."""

import logging
import math

import pytest
import torch

from sgl_slim.standins import gpu_ops

OPS = torch.ops.sgl_kernel


def setup_module():
    gpu_ops.register()


def _close(got, want, dtype):
    # bf16 / fp16 outputs: one rounding of an fp32 result
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def test_register_is_idempotent_and_defines_every_op():
    assert gpu_ops.register() == []
    for name in gpu_ops.OP_NAMES:
        assert hasattr(OPS, name), name


def _rms_ref(x, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rmsnorm_and_gemma_rmsnorm(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(7, 3, 96, dtype=dtype), torch.randn(96, dtype=dtype)
    out = torch.empty_like(x)
    OPS.rmsnorm.default(out, x, w, 1e-6, False)
    _close(out, _rms_ref(x, 1e-6) * w.double(), dtype)
    OPS.gemma_rmsnorm.default(out, x, w, 1e-6, False)
    _close(out, _rms_ref(x, 1e-6) * (1 + w.double()), dtype)


@pytest.mark.parametrize("gemma", [False, True])
def test_fused_add_rmsnorm_updates_both_in_place(gemma):
    torch.manual_seed(1)
    x, r, w = (torch.randn(5, 64, dtype=torch.bfloat16) for _ in range(3))
    x_in, r_in = x.clone(), r.clone()
    op = OPS.gemma_fused_add_rmsnorm if gemma else OPS.fused_add_rmsnorm
    op.default(x_in, r_in, w, 1e-5, False)
    total = x.double() + r.double()
    _close(r_in, total, torch.bfloat16)
    scale = (1 + w.double()) if gemma else w.double()
    _close(x_in, _rms_ref(total, 1e-5) * scale, torch.bfloat16)


@pytest.mark.parametrize("name, act", [
    ("silu_and_mul", lambda g: g / (1 + torch.exp(-g))),
    ("gelu_and_mul", lambda g: 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))),
    ("gelu_tanh_and_mul", lambda g: 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))),
])
def test_act_and_mul(name, act):
    torch.manual_seed(2)
    x = torch.randn(3, 5, 2 * 40, dtype=torch.float16) * 3
    out = torch.empty(3, 5, 40, dtype=torch.float16)
    getattr(OPS, name).default(out, x)
    gate, up = x[..., :40].double(), x[..., 40:].double()
    _close(out, act(gate) * up, torch.float16)


def _rope_ref(x, positions, head_size, rot_dim, base, neox):
    # each pair (a, b) of a head's first rot_dim dims, as a complex number, times exp(i * pos * base^(-2j/rot_dim))
    heads = x.double().view(x.shape[0], -1, head_size).clone()
    for t, pos in enumerate(positions.tolist()):
        for j in range(rot_dim // 2):
            angle = pos * base ** (-2 * j / rot_dim)
            a_idx, b_idx = (j, j + rot_dim // 2) if neox else (2 * j, 2 * j + 1)
            a, b = heads[t, :, a_idx].clone(), heads[t, :, b_idx].clone()
            heads[t, :, a_idx] = a * math.cos(angle) - b * math.sin(angle)
            heads[t, :, b_idx] = b * math.cos(angle) + a * math.sin(angle)
    return heads.view(x.shape)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rot_dim", [32, 16])     # 16: partial rotary, the rest of each head untouched
def test_rotary_embedding(neox, rot_dim):
    torch.manual_seed(3)
    head_size, base, max_pos = 32, 10000.0, 50
    inv_freq = base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()            # [max_pos, rot_dim]
    positions = torch.tensor([0, 7, 3, 49, 12])
    q = torch.randn(5, 4 * head_size, dtype=torch.bfloat16)
    k = torch.randn(5, 2, head_size, dtype=torch.bfloat16)
    q_in, k_in = q.clone(), k.clone()
    OPS.rotary_embedding.default(positions, q_in, k_in, head_size, cache, neox)
    _close(q_in, _rope_ref(q, positions, head_size, rot_dim, base, neox), torch.bfloat16)
    _close(k_in, _rope_ref(k, positions, head_size, rot_dim, base, neox), torch.bfloat16)
    q_only = q.clone()
    OPS.rotary_embedding.default(positions, q_only, None, head_size, cache, neox)
    assert torch.equal(q_only, q_in)


def test_top_k_renorm_probs():
    torch.manual_seed(4)
    probs = torch.softmax(torch.randn(4, 37), -1)
    out = torch.empty_like(probs)
    ks = [3, 1, 0, 37]                       # 0 and the vocab size keep the whole row
    OPS.top_k_renorm_probs.default(probs, out, torch.tensor(ks, dtype=torch.int32), 0)
    for row, k in enumerate(ks):
        keep = probs[row].argsort(descending=True)[: (k if 0 < k < 37 else 37)]
        want = torch.zeros(37, dtype=torch.float64)
        want[keep] = probs[row, keep].double() / probs[row, keep].double().sum()
        _close(out[row], want, torch.float32)
    OPS.top_k_renorm_probs.default(probs, out, None, 2)
    assert (out > 0).sum(-1).tolist() == [2, 2, 2, 2]


def test_top_p_renorm_probs():
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.9, 0.03, 0.02]])
    out = torch.empty_like(probs)
    OPS.top_p_renorm_probs.default(probs, out, torch.tensor([0.7, 0.6, 0.5]), 0.0)
    # row 0: 0.5 (mass above 0) and 0.3 (mass above 0.5 < 0.7) kept; row 1: three tokens (0, .25, .5 < .6);
    # row 2: only 0.9
    want = torch.tensor([[0.5 / 0.8, 0, 0.3 / 0.8, 0], [1 / 3, 1 / 3, 1 / 3, 0], [0, 1, 0, 0]])
    _close(out, want, torch.float32)
    OPS.top_p_renorm_probs.default(probs, out, None, 1.0)
    _close(out, probs, torch.float32)


def test_weak_ref_tensor_aliases_its_input():
    x = torch.arange(6.0).view(2, 3)
    y = OPS.weak_ref_tensor(x)
    assert y.data_ptr() == x.data_ptr() and y.shape == x.shape
    x[0, 0] = 42.0
    assert y[0, 0] == 42.0


@pytest.mark.parametrize("indices", [None, [2, 0]])
def test_apply_token_bitmask(indices):
    torch.manual_seed(5)
    vocab, width = 70, 2                     # the bitmask covers 64 tokens: the last 6 stay as they are
    logits = torch.randn(3, vocab)
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, width), dtype=torch.int32)
    want = logits.clone()
    for row in (range(3) if indices is None else indices):
        for t in range(64):
            if not (int(bitmask[row, t // 32]) >> (t % 32)) & 1:
                want[row, t] = -math.inf
    idx = None if indices is None else torch.tensor(indices, dtype=torch.int32)
    OPS.apply_token_bitmask_inplace_cuda(logits, bitmask, idx)
    assert torch.equal(logits, want)


def test_merge_state_v2_equals_attention_over_both_parts():
    torch.manual_seed(6)
    T, H, D, na, nb = 5, 3, 8, 6, 9
    scores = torch.randn(T, H, na + nb, dtype=torch.float64) * 3
    values = torch.randn(na + nb, D, dtype=torch.float64)

    def attend(s, v):   # output and natural-log log-sum-exp of one part
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)

    v_a, s_a = attend(scores[..., :na], values[:na])
    v_b, s_b = attend(scores[..., na:], values[na:])
    v_all, s_all = attend(scores, values)
    v_m, s_m = torch.empty(T, H, D, dtype=torch.float32), torch.empty(T, H, dtype=torch.float32)
    OPS.merge_state_v2.default(v_a.float(), s_a.float(), v_b.float(), s_b.float(), v_m, s_m)
    _close(v_m, v_all, torch.float32)
    _close(s_m, s_all, torch.float32)
    # +inf marks an empty part (SGLang's kernel treats it as -inf): the other part passes through
    OPS.merge_state_v2.default(v_a.float(), torch.full_like(s_a.float(), math.inf), v_b.float(), s_b.float(),
                               v_m, s_m)
    _close(v_m, v_b, torch.float32)


def test_missing_lookups_are_logged_once_each(caplog):
    gpu_ops.log_missing_lookups()
    gpu_ops.log_missing_lookups()            # idempotent
    with caplog.at_level(logging.WARNING, logger="sgl_slim.standins"):
        assert not hasattr(torch.ops.sgl_kernel, "no_such_op_for_the_test")
        assert not hasattr(torch.ops.sgl_kernel, "no_such_op_for_the_test")
    assert "no_such_op_for_the_test" in gpu_ops.missing_lookups()
    assert sum("no_such_op_for_the_test" in r.getMessage() for r in caplog.records) == 1
    out = torch.empty(2, 4)
    OPS.rmsnorm.default(out, torch.ones(2, 4), torch.ones(4), 1e-6, False)   # defined ops still resolve
    torch.testing.assert_close(out, torch.ones(2, 4), rtol=1e-5, atol=1e-5)
