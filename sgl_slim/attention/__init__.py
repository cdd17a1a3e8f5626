"""Sparse prefill attention (S2O).  Plain torch + Triton; never imports sglang.

Public API:
    s2o_attention(q, k, v, *, tau, block_size=128, segment_size=2048, sm_scale=None, return_stats=False,
                  variant="v4", audit_last=None, audit_form=None)
    s2o_attention_paged(q, k_pool, v_pool, *, qo_indptr, kv_indptr, kv_indices, tau, block_size=128,
                        segment_size=2048, sm_scale=None, return_lse=False, return_stats=False, variant="v4",
                        audit_last=None, audit_form=None)

``tau`` is a float or a tensor [Hkv] (one threshold per KV head).  ``variant`` names a setting of the early
stop (``s2o_ref.VARIANTS``): "v2" stops when the predicted unvisited mass falls below tau times the mass so far
and keeps that prediction in the softmax; "v1" is the original per-block rule; "v3" plans each segment's budget
before the scan: the fewest ranked blocks whose mass, estimated from the exact softmax of sampled query rows,
leaves out at most tau; "v4" (default) is v3 followed by an audit of every block the budget leaves out (its
scores only): a block joins the softmax if one of its keys holds more than tau of some row's mass so far; "v5"
runs that audit only for the tiles of the sequence's last 128 positions (the rows the next token is read from;
``audit_last=N`` widens it to the last N), at about v3's cost.  ``audit_form`` picks how the GPU kernel runs
that audit (``AUDIT_FORMS``; the same visited blocks either way).  v4 is
the default because its error follows tau on every input measured (H200, benchmarks/s2o.md, "Defaults": tau
1e-2 -> rel-L2 0.9-1.5%, 3e-3 -> 0.3-0.6% at 32K-128K) where v2's error falls slowly with tau (mixed 128K: 3.5%
at 3e-3, 2.8% at 1e-3), and it keeps the trained testbed model's retrieval at a third of the blocks.

CUDA tensors run the Triton kernel (imported lazily: ``import sgl_slim.attention`` needs no Triton);
anything else runs the fp32 reference (``s2o_ref``) with exactly the same semantics.
"""

from __future__ import annotations

import math

import torch

from .s2o_ref import FP8_KV, VARIANTS, dense_attention_ref, rank_keys, s2o_attention_ref, tau_per_head

__all__ = ["s2o_attention", "s2o_attention_paged", "s2o_attention_ref", "dense_attention_ref", "rank_keys",
           "plan_paged", "VARIANTS", "DEFAULT_VARIANT", "AUDIT_FORMS", "DEFAULT_AUDIT_FORM"]

DEFAULT_VARIANT = "v4"
# How the kernel runs v4/v5's audit: "fused" inside the attention kernel, after the planned blocks; "split" as
# kernels of their own (several q heads of a KV group share each gathered K tile), then the hits.  Same visited
# blocks, the output within fp32 rounding; the CPU reference has one form.  Defaults measured on the H200
# (benchmarks/s2o.md, "v4's audit as kernels of its own"): split for v4 (the testbed's attention 6% faster at 32K,
# 128K served 9% faster), fused for v5 (its audit covers the last rows only: split costs it 33% at 32K).
AUDIT_FORMS = ("fused", "split")
DEFAULT_AUDIT_FORM = {"v4": "split", "v5": "fused"}

Q_TILE = 128  # query rows per early-stop decision (the kernel's BLOCK_M)


def _q_tile(segment_size: int) -> int:
    return Q_TILE if segment_size % Q_TILE == 0 else segment_size


def _settings(variant: str, audit_last: int | None) -> dict:
    """The variant's early-stop settings (``s2o_ref.VARIANTS``), with v5's audited rows set by ``audit_last``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    settings = dict(VARIANTS[variant])
    if audit_last is not None:
        if not settings.get("audit_last"):
            raise ValueError(f"audit_last applies to the variants that audit the last rows only (v5), "
                             f"not {variant!r}")
        if isinstance(audit_last, bool) or not isinstance(audit_last, int) or audit_last < 1:
            raise ValueError(f"audit_last must be an int >= 1, got {audit_last!r}")
        settings["audit_last"] = audit_last
    return settings


def _audit_split(audit_form: str | None, variant: str) -> bool:
    """The kernel's ``audit_split`` for an ``audit_form`` (None: the variant's ``DEFAULT_AUDIT_FORM``)."""
    form = DEFAULT_AUDIT_FORM.get(variant, "fused") if audit_form is None else audit_form
    if form not in AUDIT_FORMS:
        raise ValueError(f"audit_form must be one of {AUDIT_FORMS}, got {audit_form!r}")
    return form == "split"


def _validate(q, k_pool, v_pool, tau, block_size, segment_size):
    tau_per_head(tau, k_pool.shape[1] if k_pool.dim() == 3 else 1, "cpu")   # finite, >= 0, one per KV head
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"block_size must be one of 16, 32, 64, 128, got {block_size}")
    if segment_size < block_size or segment_size % block_size:
        raise ValueError(f"segment_size must be a positive multiple of block_size ({block_size}), "
                         f"got {segment_size}")
    if q.dim() != 3 or k_pool.dim() != 3 or v_pool.shape != k_pool.shape:
        raise ValueError(f"expected q [T, Hq, D] and k/v [N, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    if q.shape[1] % k_pool.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k_pool.shape[1]})")
    if q.shape[2] != k_pool.shape[2]:
        raise ValueError(f"head dims differ: q {q.shape[2]}, k {k_pool.shape[2]}")
    dtypes = f"got q {q.dtype}, k {k_pool.dtype}, v {v_pool.dtype}"
    if k_pool.dtype in FP8_KV or v_pool.dtype in FP8_KV:
        if v_pool.dtype != k_pool.dtype or q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"an fp8 K/V pool needs K and V in the same fp8 dtype and q in bf16 / fp16; {dtypes}")
    elif not q.dtype.is_floating_point or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one floating-point dtype (or K/V be one fp8 dtype); {dtypes}")


def _check_offsets(qo: list[int], kvp: list[int]) -> None:
    """A batch's host offsets: [B + 1] each from 0, one (q_len <= kv_len) pair per sequence (once per plan)."""
    if len(qo) != len(kvp) or len(qo) < 1 or qo[0] != 0 or kvp[0] != 0:
        raise ValueError(f"qo_indptr and kv_indptr must be [B + 1] offsets starting at 0; got {len(qo)} and "
                         f"{len(kvp)} entries starting at {qo[:1]} and {kvp[:1]}")
    for b in range(len(qo) - 1):
        q_len, kv_len = qo[b + 1] - qo[b], kvp[b + 1] - kvp[b]
        if q_len < 0 or kv_len < q_len:
            raise ValueError(f"sequence {b}: {q_len} queries and {kv_len} keys (need 0 <= queries <= keys)")


def _check_totals(qo: list[int], kvp: list[int], n_q: int, n_indices: int) -> None:
    """The offsets against the tensors of one call: the query rows exactly q's, the keys within kv_indices."""
    if qo[-1] != n_q:
        raise ValueError(f"qo_indptr covers {qo[-1]} query rows, q has {n_q}")
    if kvp[-1] > n_indices:
        raise ValueError(f"kv_indptr covers {kvp[-1]} keys, kv_indices has {n_indices}")


def _density(counts_computed: torch.Tensor, counts_causal: torch.Tensor) -> float:
    c = int(counts_causal.sum())
    return float(counts_computed.sum()) / c if c else 1.0


def s2o_attention_paged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, *,
                        qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                        tau, block_size: int = 128, segment_size: int = 2048,
                        sm_scale: float | None = None, return_lse: bool = False, return_stats: bool = False,
                        variant: str = DEFAULT_VARIANT, plan=None, return_counts: bool = False,
                        k_scale: float = 1.0, v_scale: float = 1.0, audit_last: int | None = None,
                        audit_form: str | None = None):
    """S2O prefill for a batch of sequences whose K/V live in a token-slot pool (page size 1).

    q:          [Tq, Hq, D]   queries of all sequences, packed (sequence b owns rows
                              qo_indptr[b]:qo_indptr[b+1]); these are the LAST q_len positions of b.
    k_pool,
    v_pool:     [num_slots, Hkv, D]  K/V of every token (including the new ones).
    qo_indptr:  [B+1] int     query row offsets.
    kv_indptr:  [B+1] int     offsets into kv_indices.
    kv_indices: [total_kv] int token slots of sequence b in position order
                              (kv_len_b = kv_indptr[b+1] - kv_indptr[b], prefix_b = kv_len_b - q_len_b).
    tau:        early-stop threshold (0 = dense): a float or a HOST tensor [Hkv] (one per KV head).
    variant:    a key of ``VARIANTS`` (default "v4"), see the module doc.
    audit_last: v5 only: audit the tiles of the sequence's last ``audit_last`` positions (None: 128).
    audit_form: v4 / v5 on the GPU: how the kernel runs the audit, one of ``AUDIT_FORMS`` (None: the variant's
                ``DEFAULT_AUDIT_FORM``).
    plan:       this batch's ``plan_paged(...)`` (built once, reused by every layer): then the call reads
                nothing back from the GPU (no host synchronisation).  Without it the offsets are read here.
    k_scale,
    v_scale:    an fp8 K/V pool (float8_e4m3fn / e5m2, q in bf16 / fp16) holds K / k_scale and V / v_scale,
                as a serving engine's fp8 KV cache stores them; every other pool ignores them (1.0).

    Returns out [Tq, Hq, D] (q's dtype); plus lse [Tq, Hq] fp32 (natural log) if return_lse; plus
    stats dict if return_stats: density (float), density_per_seq [B], density_per_head [Hq] (host reads);
    plus (computed, causal) [B, Hq] int64 score-block counts on q's device if return_counts (no host read).
    CUDA -> Triton kernel; otherwise the fp32 reference (exact semantics, slow), except that tau 0 (dense) runs
    as batched fp32 matmuls (the same result, fast enough for CPU serving of short prompts).
    """
    return _paged(q, k_pool, v_pool, qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices, tau=tau,
                  block_size=block_size, segment_size=segment_size, sm_scale=sm_scale, return_lse=return_lse,
                  return_stats=return_stats, kv_contiguous=False, variant=variant, plan=plan,
                  return_counts=return_counts, k_scale=k_scale, v_scale=v_scale, audit_last=audit_last,
                  audit_form=audit_form)


def plan_paged(qo_indptr, kv_indptr, *, block_size: int = 128, segment_size: int = 2048, device="cuda"):
    """The shape-only part of one batch's S2O launches (tile list, device tables), from HOST offsets (lists or
    CPU tensors, as ``s2o_attention_paged`` takes them on the device): build once per forward batch, pass as
    ``plan=`` to every layer's call.  On the CPU the plan only carries the host offsets."""
    from . import s2o_triton  # noqa: PLC0415 (lazy: Triton only where a GPU runs it)
    _check_offsets([int(x) for x in qo_indptr], [int(x) for x in kv_indptr])
    return s2o_triton.plan_paged(qo_indptr, kv_indptr, block_size=block_size, segment_size=segment_size,
                                 q_tile=_q_tile(segment_size), device=device)


def _paged(q, k_pool, v_pool, *, qo_indptr, kv_indptr, kv_indices, tau, block_size, segment_size, sm_scale,
           return_lse, return_stats, kv_contiguous, variant, plan=None, return_counts=False, k_scale=1.0,
           v_scale=1.0, audit_last=None, audit_form=None):
    # kv_contiguous: kv_indices == arange (one sequence stored in order): the kernel computes the slots
    settings = _settings(variant, audit_last)
    audit_split = _audit_split(audit_form, variant)
    _validate(q, k_pool, v_pool, tau, block_size, segment_size)
    fp8 = k_pool.dtype in FP8_KV
    if not fp8:
        k_scale = v_scale = 1.0
    elif not (math.isfinite(k_scale) and math.isfinite(v_scale) and k_scale > 0 and v_scale > 0):
        raise ValueError(f"k_scale and v_scale must be finite and > 0, got {k_scale}, {v_scale}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[2])
    # host offsets: the plan's (checked when it was made), else read here (a host read, as the kernel launch
    # without a plan makes anyway)
    if plan is not None:
        qo, kvp = list(plan.qo), list(plan.kvp)
    else:
        qo, kvp = torch.as_tensor(qo_indptr).tolist(), torch.as_tensor(kv_indptr).tolist()
        _check_offsets(qo, kvp)
    _check_totals(qo, kvp, q.shape[0], kv_indices.numel())
    dense = float(torch.as_tensor(tau).max()) == 0
    if q.is_cuda:
        from . import s2o_triton  # noqa: PLC0415 (lazy: Triton only where a GPU runs it)
        out, lse, computed, causal = s2o_triton.s2o_paged(
            q, k_pool, v_pool, qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices, tau=tau,
            block_size=block_size, segment_size=segment_size, q_tile=_q_tile(segment_size), sm_scale=scale,
            return_lse=return_lse, kv_contiguous=kv_contiguous, plan=plan, k_scale=k_scale, v_scale=v_scale,
            audit_split=audit_split, **settings)
    else:
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        computed = torch.zeros(len(qo) - 1, q.shape[1], dtype=torch.int64)
        causal = torch.zeros_like(computed)
        for b in range(len(qo) - 1):
            if qo[b + 1] == qo[b]:
                continue
            slots = kv_indices[kvp[b]:kvp[b + 1]].long()
            kb, vb = k_pool[slots], v_pool[slots]
            if fp8:     # the reference reads the dequantised cache in q's dtype, as the kernel's ranking does
                kb, vb = kb.to(q.dtype) * k_scale, vb.to(q.dtype) * v_scale
            if dense:
                # every causal block is visited: plain dense attention (fp32, batched matmuls) is the same
                # computation as the block-by-block reference, without its Python loop over blocks
                o, l_ = _dense_chunked(q[qo[b]:qo[b + 1]], kb, vb, scale, return_lse)
                computed[b] = causal[b] = 1
            else:
                o, l_, cnt = s2o_attention_ref(q[qo[b]:qo[b + 1]], kb, vb, tau=tau,
                                               block_size=block_size, segment_size=segment_size,
                                               q_tile=_q_tile(segment_size), sm_scale=scale, **settings)
                computed[b], causal[b] = cnt["computed"].cpu(), cnt["causal"].cpu()
            out[qo[b]:qo[b + 1]] = o.to(q.dtype)
            lse[qo[b]:qo[b + 1]] = l_
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_stats:
        c_d, k_d = computed.double(), causal.double()
        result += ({
            "density": _density(c_d, k_d),
            "density_per_seq": (c_d.sum(1) / k_d.sum(1).clamp(min=1)).tolist(),
            "density_per_head": (c_d.sum(0) / k_d.sum(0).clamp(min=1)).tolist(),
        },)
    if return_counts:
        result += ((computed, causal),)
    return result[0] if len(result) == 1 else result


DENSE_Q_CHUNK = 1024  # query rows per dense fp32 matmul on the CPU (bounds the [Hq, rows, kv_len] scores)


def _dense_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, need_lse: bool):
    """Causal fp32 attention of one sequence's last Tq positions, DENSE_Q_CHUNK query rows at a time.
    Without ``need_lse``, torch's SDPA (about 3.5x faster on the CPU); else the explicit fp32 softmax, which
    also gives the log-sum-exp (lse is NaN when not needed)."""
    tq, length, hq = q.shape[0], k.shape[0], q.shape[1]
    group = hq // k.shape[1]
    outs, lses = [], []
    for i in range(0, tq, DENSE_Q_CHUNK):
        rows = q[i:i + DENSE_Q_CHUNK]
        end = length - tq + i + rows.shape[0]          # keys up to the chunk's last query position
        if need_lse:
            o, l_ = dense_attention_ref(rows, k[:end], v[:end], sm_scale=scale)
        else:
            kh = k[:end].float().repeat_interleave(group, 1).transpose(0, 1)
            vh = v[:end].float().repeat_interleave(group, 1).transpose(0, 1)
            mask = torch.ones(rows.shape[0], end, dtype=torch.bool, device=q.device).tril(end - rows.shape[0])
            o = torch.nn.functional.scaled_dot_product_attention(
                rows.float().transpose(0, 1), kh, vh, attn_mask=mask, scale=scale).transpose(0, 1)
            l_ = torch.full(rows.shape[:2], math.nan, dtype=torch.float32, device=q.device)
        outs.append(o)
        lses.append(l_)
    return torch.cat(outs), torch.cat(lses)


def s2o_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tau, block_size: int = 128,
                  segment_size: int = 2048, sm_scale: float | None = None, return_stats: bool = False,
                  variant: str = DEFAULT_VARIANT, audit_last: int | None = None, audit_form: str | None = None):
    """S2O causal attention of ONE sequence.  q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D].

    With return_stats, also a dict: density (computed score blocks / causal score blocks),
    density_per_head [Hq].  CUDA -> Triton kernel, otherwise the fp32 reference.
    """
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"s2o_attention takes one causal sequence: q has {q.shape[0]} rows, k {k.shape[0]}; "
                         f"use s2o_attention_paged for queries after a cached prefix")
    T = q.shape[0]
    dev = q.device
    indptr = torch.tensor([0, T], dtype=torch.int32, device=dev)
    res = _paged(q, k, v, qo_indptr=indptr, kv_indptr=indptr,
                 kv_indices=torch.arange(T, dtype=torch.int32, device=dev), tau=tau,
                 block_size=block_size, segment_size=segment_size, sm_scale=sm_scale, return_lse=False,
                 return_stats=return_stats, kv_contiguous=True, variant=variant, audit_last=audit_last,
                 audit_form=audit_form)
    if not return_stats:
        return res
    out, stats = res
    stats.pop("density_per_seq")
    return out, stats
