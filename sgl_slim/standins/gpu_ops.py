"""Plain-torch stand-ins for the CUDA ops of ``sgl_kernel`` that SGLang 0.5.23 calls on the GPU path.

Used on a GPU host where the compiled library of the ``sglang-kernel`` wheel cannot load (it was built
against another torch). The ``sgl_kernel`` package's Python wrappers stay SGLang's own (extracted from the
wheel by scripts/gpu_wheels.sh); they call ``torch.ops.sgl_kernel.<name>.default(...)``, which lands here.
Each op has the schema of the compiled one and computes its definition in fp32, written to the caller's
buffers in place where the original writes in place. None of them is on S2O's hot path (attention runs in
Triton); they are memory-bound elementwise work, so plain torch costs a few extra passes over the activations.

:func:`log_missing_lookups` makes every lookup of an op that no one defined print one line, naming it: on a
new model or path the log says which op to add next.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from sgl_slim.standins import NAMESPACE, define_ops

logger = logging.getLogger("sgl_slim.standins")


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rmsnorm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, eps: float, enable_pdl: bool) -> None:
    """out = input / rms(input) * weight (rms over the last dim, in fp32)."""
    out.copy_(_rms(input, eps) * weight.float())


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      enable_pdl: bool) -> None:
    """residual += input; input = rmsnorm(residual) * weight. Both in place."""
    x = input.float() + residual.float()
    residual.copy_(x)
    input.copy_(_rms(x, eps) * weight.float())


def gemma_rmsnorm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, eps: float,
                  enable_pdl: bool) -> None:
    """Gemma's RMSNorm: out = input / rms(input) * (1 + weight)."""
    out.copy_(_rms(input, eps) * (1.0 + weight.float()))


def gemma_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            enable_pdl: bool) -> None:
    """residual += input; input = gemma_rmsnorm(residual). Both in place."""
    x = input.float() + residual.float()
    residual.copy_(x)
    input.copy_(_rms(x, eps) * (1.0 + weight.float()))


def _act_and_mul(act, out: torch.Tensor, input: torch.Tensor) -> None:
    # input [..., 2d] = (gate, up): out [..., d] = act(gate) * up
    d = input.shape[-1] // 2
    out.copy_(act(input[..., :d].float()) * input[..., d:].float())


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    _act_and_mul(F.silu, out, input)


def gelu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    _act_and_mul(F.gelu, out, input)


def gelu_tanh_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    _act_and_mul(lambda x: F.gelu(x, approximate="tanh"), out, input)


def _rotate(x: torch.Tensor, positions: torch.Tensor, head_size: int, cos_sin_cache: torch.Tensor,
            is_neox: bool) -> None:
    # x: [T, H * head_size] or [T, H, head_size], rotated in place over the first rot_dim of each head.
    # cos_sin_cache: [max_pos, rot_dim] = (cos | sin), each rot_dim / 2 wide.
    rot_dim = cos_sin_cache.shape[-1]
    heads = x.view(x.shape[0], -1, head_size)
    cos, sin = cos_sin_cache.index_select(0, positions.flatten().long()).float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot = heads[..., :rot_dim]
    if is_neox:       # halves: (x1 | x2)
        x1, x2 = rot[..., :rot_dim // 2].float(), rot[..., rot_dim // 2:].float()
        rot.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    else:             # GPT-J: interleaved pairs (x1, x2), (x1, x2), ...
        x1, x2 = rot[..., 0::2].float(), rot[..., 1::2].float()
        rot.copy_(torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2))


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None, head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """Rotary position embedding of query and key, in place (vLLM's / SGLang's ``rotary_embedding``)."""
    _rotate(query, positions, head_size, cos_sin_cache, is_neox)
    if key is not None:
        _rotate(key, positions, head_size, cos_sin_cache, is_neox)


def top_k_renorm_probs(probs: torch.Tensor, renorm_probs: torch.Tensor, maybe_top_k_arr: torch.Tensor | None,
                       top_k_val: int) -> None:
    """Row i keeps its k_i largest probabilities (ties with the k-th kept too) and is renormalised to sum 1;
    k_i = maybe_top_k_arr[i], else top_k_val; k outside [1, vocab) keeps the whole row."""
    rows, vocab = probs.shape
    k = (maybe_top_k_arr.long() if maybe_top_k_arr is not None
         else torch.full((rows,), int(top_k_val), dtype=torch.long, device=probs.device))
    k = torch.where((k < 1) | (k >= vocab), torch.full_like(k, vocab), k)
    sorted_probs = probs.float().sort(dim=-1, descending=True).values
    pivot = sorted_probs.gather(1, (k - 1)[:, None])                     # [rows, 1] the k-th largest
    kept = torch.where(probs.float() >= pivot, probs.float(), torch.zeros_like(probs, dtype=torch.float32))
    renorm_probs.copy_(kept / kept.sum(-1, keepdim=True))


def top_p_renorm_probs(probs: torch.Tensor, renorm_probs: torch.Tensor, maybe_top_p_arr: torch.Tensor | None,
                       top_p_val: float) -> None:
    """Row i keeps the smallest set of its largest probabilities whose mass reaches p_i (a token is kept when
    the mass of the tokens above it is below p_i) and is renormalised; p_i = maybe_top_p_arr[i], else top_p_val."""
    rows = probs.shape[0]
    p = (maybe_top_p_arr.float() if maybe_top_p_arr is not None
         else torch.full((rows,), float(top_p_val), dtype=torch.float32, device=probs.device))
    sorted_probs, order = probs.float().sort(dim=-1, descending=True)
    mass_above = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = mass_above < p[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    kept = torch.where(keep, probs.float(), torch.zeros_like(probs, dtype=torch.float32))
    renorm_probs.copy_(kept / kept.sum(-1, keepdim=True))


def weak_ref_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor over the same memory. (The compiled op returns one that does not keep the memory alive; this
    one does, which only matters to CUDA-graph capture: the stand-in mode runs without CUDA graphs.)"""
    return tensor.detach()


def apply_token_bitmask_inplace_cuda(logits: torch.Tensor, bitmask: torch.Tensor,
                                     indices: torch.Tensor | None = None) -> None:
    """logits[r, t] = -inf where bit t % 32 of bitmask[r, t // 32] is 0, for the rows r in ``indices`` (all
    rows if None); tokens beyond the bitmask's 32 * width are left alone."""
    vocab = min(logits.shape[-1], bitmask.shape[-1] * 32)
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.to(torch.int32)[..., None] >> bits) & 1).flatten(-2)[..., :vocab].bool()
    rows = (torch.arange(logits.shape[0], device=logits.device) if indices is None
            else indices.to(logits.device).long())
    view = logits[rows, :vocab]
    logits[rows, :vocab] = view.masked_fill(~allowed[rows.to(allowed.device)].to(logits.device), -math.inf)


def merge_state_v2(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor,
                   v_merged: torch.Tensor, s_merged: torch.Tensor) -> None:
    """Merge two partial attention results: v [T, H, D] with their log-sum-exp s [T, H] (natural log; +inf
    stands for an empty part, as in SGLang's Triton kernel). v_merged, s_merged written in place."""
    s_a = torch.where(s_a == math.inf, -math.inf, s_a.float())
    s_b = torch.where(s_b == math.inf, -math.inf, s_b.float())
    s_max = torch.maximum(s_a, s_b)
    w_a, w_b = torch.exp(s_a - s_max), torch.exp(s_b - s_max)
    total = w_a + w_b
    s_merged.copy_(torch.log(total) + s_max)
    v_merged.copy_((v_a.float() * (w_a / total)[..., None] + v_b.float() * (w_b / total)[..., None]))


_OPS = {
    "rmsnorm": ("(Tensor(a!) output, Tensor input, Tensor weight, float eps, bool enable_pdl) -> ()", rmsnorm),
    "fused_add_rmsnorm": ("(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps, bool enable_pdl)"
                          " -> ()", fused_add_rmsnorm),
    "gemma_rmsnorm": ("(Tensor(a!) output, Tensor input, Tensor weight, float eps, bool enable_pdl) -> ()",
                      gemma_rmsnorm),
    "gemma_fused_add_rmsnorm": ("(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps, "
                                "bool enable_pdl) -> ()", gemma_fused_add_rmsnorm),
    "silu_and_mul": ("(Tensor(a!) out, Tensor input) -> ()", silu_and_mul),
    "gelu_and_mul": ("(Tensor(a!) out, Tensor input) -> ()", gelu_and_mul),
    "gelu_tanh_and_mul": ("(Tensor(a!) out, Tensor input) -> ()", gelu_tanh_and_mul),
    "rotary_embedding": ("(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size, "
                         "Tensor cos_sin_cache, bool is_neox) -> ()", rotary_embedding),
    "top_k_renorm_probs": ("(Tensor probs, Tensor(a!) renorm_probs, Tensor? maybe_top_k_arr, int top_k_val)"
                           " -> ()", top_k_renorm_probs),
    "top_p_renorm_probs": ("(Tensor probs, Tensor(a!) renorm_probs, Tensor? maybe_top_p_arr, float top_p_val)"
                           " -> ()", top_p_renorm_probs),
    "weak_ref_tensor": ("(Tensor(a) tensor) -> Tensor(a)", weak_ref_tensor),
    "apply_token_bitmask_inplace_cuda": ("(Tensor(a!) logits, Tensor bitmask, Tensor? indices=None) -> ()",
                                         apply_token_bitmask_inplace_cuda),
    "merge_state_v2": ("(Tensor v_a, Tensor s_a, Tensor v_b, Tensor s_b, Tensor(a!) v_merged, "
                       "Tensor(b!) s_merged) -> ()", merge_state_v2),
}
OP_NAMES = tuple(_OPS)


def register() -> list[str]:
    """Define the GPU stand-ins under ``torch.ops.sgl_kernel`` (idempotent); returns the names added."""
    return define_ops(_OPS)


_MISSING: set[str] = set()


class _LoggedNamespace(torch._ops._OpNamespace):
    """``torch.ops.sgl_kernel`` that names, once each, the ops looked up but defined by no one."""

    def __getattr__(self, op_name: str):
        try:
            return super().__getattr__(op_name)
        except AttributeError:
            if not op_name.startswith("__") and op_name not in _MISSING:
                _MISSING.add(op_name)
                logger.warning("sgl_slim stand-ins: torch.ops.%s.%s looked up but not defined (a compiled "
                               "sgl_kernel op with no stand-in: add one to sgl_slim/standins/ if it is called)",
                               NAMESPACE, op_name)
            raise


def log_missing_lookups() -> None:
    """Replace ``torch.ops.sgl_kernel`` by a namespace that logs each missing op's name once (idempotent)."""
    if not isinstance(getattr(torch.ops, NAMESPACE), _LoggedNamespace):
        setattr(torch.ops, NAMESPACE, _LoggedNamespace(NAMESPACE))


def missing_lookups() -> set[str]:
    """The op names looked up and not found so far in this process."""
    return set(_MISSING)
