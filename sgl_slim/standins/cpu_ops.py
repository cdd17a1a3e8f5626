"""Pure-torch stand-ins for the few ``torch.ops.sgl_kernel.*_cpu`` ops SGLang's CPU path calls.

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports these from ``sgl_kernel``, whose PyPI wheel is
CUDA-only; its loader falls back to ``import common_ops``. sgl_slim ships a ``common_ops`` module
(``sgl_slim/standins/cpu_shim/common_ops.py``, put on the path by the launcher in CPU mode only) that calls
:func:`register`. Each op below is the plain-loop meaning of SGLang's own Triton kernel of the same name.

Deliberately NOT defined: ops SGLang probes with ``hasattr`` to detect Intel AMX or fused CPU kernels
(``convert_weight_packed``, ``fused_qk_norm_rope_cpu``, ``fused_qk_norm_cpu``, ``shm_group_initialize``).
Leaving them out makes SGLang take its pure-torch ``forward_native`` paths.
"""

from __future__ import annotations

import ctypes

import torch

from sgl_slim.standins import define_ops

AMX_PROBES = ("convert_weight_packed", "fused_qk_norm_rope_cpu", "fused_qk_norm_cpu", "shm_group_initialize")


def assign_req_to_token_pool(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                             start_offset: torch.Tensor, end_offset: torch.Tensor,
                             out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """For request i: req_to_token[req_pool_indices[i], start[i]:end[i]] = the next (end-start) slots of
    out_cache_loc (the slots of all requests are packed back to back, in batch order)."""
    assert req_to_token.shape[1] == pool_len, f"pool_len {pool_len} != req_to_token width {req_to_token.shape[1]}"
    pos = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[pos:pos + n].to(req_to_token.dtype)
        pos += n


def copy_all_layer_kv_cache(data_ptrs: torch.Tensor, strides: torch.Tensor,
                            tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
    """For every KV buffer b (a raw base address and a row stride in bytes): row tgt_loc[j] = row src_loc[j].
    All source rows are read before any is written (the Triton kernel's tile does the same)."""
    if src_loc.numel() == 0:
        return
    top = int(max(int(src_loc.max()), int(tgt_loc.max()))) + 1
    src, tgt = src_loc.long(), tgt_loc.long()
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (top * stride)).from_address(base)
        rows = torch.frombuffer(raw, dtype=torch.uint8).view(top, stride)
        rows[tgt] = rows[src].clone()


def fused_sigmoid_mul(x: torch.Tensor, gate: torch.Tensor) -> None:
    """x *= sigmoid(gate), in place (bound at import time by models/qwen3_5.py)."""
    x.mul_(torch.sigmoid(gate.to(x.dtype)))


def _gemma_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())
    return out.to(x.dtype)


def fused_qk_gemma_rmsnorm(q, k, q_weight, k_weight, eps: float, head_dim: int):
    """Gemma RMSNorm (x / rms(x) * (1 + w)) of q and k per head; returns [rows, head_dim] each.
    Bound at import time by models/qwen3_5.py, which the multimodal processor registry imports."""
    return (_gemma_rmsnorm(q.reshape(-1, head_dim), q_weight, eps),
            _gemma_rmsnorm(k.reshape(-1, head_dim), k_weight, eps))


def fused_qk_gemma_rmsnorm_with_gate(q_gate, k, q_weight, k_weight, eps: float, head_dim: int, num_heads: int):
    """q_gate [seq, heads * 2 * head_dim] interleaves (q_h, gate_h) per head: normalise q and k, split the gate."""
    qg = q_gate.reshape(q_gate.shape[0], num_heads, 2 * head_dim)
    q, gate = qg[..., :head_dim], qg[..., head_dim:]
    q_out, k_out = fused_qk_gemma_rmsnorm(q, k, q_weight, k_weight, eps, head_dim)
    return q_out, k_out, gate.reshape(-1, head_dim).contiguous()


def _unsupported(name: str):
    def fail(*args):
        raise NotImplementedError(f"torch.ops.sgl_kernel.{name} has no sgl_slim CPU stand-in: this model's "
                                  "layer type (Qwen3.5 linear attention) is not supported on the CPU")
    return fail


_OPS = {
    "assign_req_to_token_pool_cpu": (
        "(Tensor req_pool_indices, Tensor(a!) req_to_token, Tensor start_offset, Tensor end_offset, "
        "Tensor out_cache_loc, int pool_len) -> ()", assign_req_to_token_pool),
    "copy_all_layer_kv_cache_cpu": (
        "(Tensor data_ptrs, Tensor strides, Tensor tgt_loc, Tensor src_loc) -> ()", copy_all_layer_kv_cache),
    "fused_sigmoid_mul_cpu": ("(Tensor(a!) x, Tensor gate) -> ()", fused_sigmoid_mul),
    "fused_qk_gemma_rmsnorm_cpu": (
        "(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps, int head_dim) -> (Tensor, Tensor)",
        fused_qk_gemma_rmsnorm),
    "fused_qk_gemma_rmsnorm_with_gate_cpu": (
        "(Tensor q_gate, Tensor k, Tensor q_weight, Tensor k_weight, float eps, int head_dim, int num_heads)"
        " -> (Tensor, Tensor, Tensor)", fused_qk_gemma_rmsnorm_with_gate),
    # bound at import time only; a call means an unsupported model reached the CPU path: say so.
    "fused_qkvzba_split_reshape_cat_contiguous_cpu": (
        "(Tensor mixed_qkvz, Tensor mixed_ba, int num_heads_qk, int num_heads_v, int head_qk, int head_v)"
        " -> (Tensor, Tensor, Tensor, Tensor)", _unsupported("fused_qkvzba_split_reshape_cat_contiguous_cpu")),
}


def register() -> list[str]:
    """Define the serving stand-ins (idempotent). Returns the names defined by this call."""
    return define_ops(_OPS)
