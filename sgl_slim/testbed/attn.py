"""Replace the prefill attention of EVERY layer of a transformers Llama model by one method, and measure it.

    method = parse_method("s2o:v2:1e-4")        # or dense, s2o:v1:TAU, topcdf:GAMMA, pbs:GAMMA, calib:FILE, ...
    with use_method(model, method) as run:       # registers "sgl_slim_testbed" with AttentionInterface
        model(input_ids)
    run.density, run.attn_ms

Method strings:
    dense                     torch SDPA (cuDNN / flash on CUDA), causal
    s2o:VARIANT:TAU           sgl_slim.attention.s2o_attention (VARIANT: a key of ``VARIANTS``, v1 / v2 / v3)
    calib:FILE                s2o_attention with the per-layer, per-KV-head taus of a calibration file
    NAME:GAMMA                a block-sparse baseline ``sgl_slim.attention.baselines.select_NAME`` run on the
                              S2O kernel with tau 0 (topcdf, pbs, cumulative_blocks, vertical_slash, ...)
    capture                   dense, and keeps each layer's q/k/v (post-RoPE) for calibration and the dump

Every call sees one sequence at a time (q [T, Hq, D]); decoding (fewer queries than keys) is refused: the
evaluation scores answers by teacher forcing (greedy exact match == every answer token is the argmax).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sgl_slim.attention import VARIANTS

ATTN_NAME = "sgl_slim_testbed"


@dataclass(frozen=True)
class Method:
    kind: str                     # dense | s2o | calib | capture | baseline
    name: str                     # display name (the method string)
    knob: float = 0.0             # tau (s2o) or gamma (baselines)
    variant: str | None = None
    calibration: object = None    # S2OCalibration for "calib"
    block_size: int | None = None
    segment_size: int | None = None


def s2o_defaults() -> tuple[int, int]:
    """(block_size, segment_size) defaults of ``s2o_attention``, read from its signature."""
    from sgl_slim.attention import s2o_attention  # noqa: PLC0415

    p = inspect.signature(s2o_attention).parameters
    return p["block_size"].default, p["segment_size"].default


def parse_method(text: str, *, block_size: int | None = None, segment_size: int | None = None) -> Method:
    """Parse a method string (module doc); ValueError names the string and what is wrong."""
    bs, ss = s2o_defaults()
    bs, ss = block_size or bs, segment_size or ss
    parts = text.split(":")
    if text in ("dense", "capture"):
        return Method(text, text)
    if parts[0] == "s2o":
        if len(parts) != 3 or parts[1] not in VARIANTS:
            raise ValueError(f"method {text!r}: expected s2o:VARIANT:TAU with VARIANT one of {sorted(VARIANTS)}")
        return Method("s2o", text, float(parts[2]), parts[1], block_size=bs, segment_size=ss)
    if parts[0] == "calib":
        from sgl_slim.attention.calibration import S2OCalibration  # noqa: PLC0415

        cal = S2OCalibration.load(":".join(parts[1:]))
        return Method("calib", "calib", 0.0, cal.variant, cal, cal.block_size, cal.segment_size)
    if len(parts) == 2:
        from sgl_slim.attention import baselines  # noqa: PLC0415

        if not callable(getattr(baselines, f"select_{parts[0]}", None)):
            known = sorted(n[7:] for n in dir(baselines) if n.startswith("select_"))
            raise ValueError(f"method {text!r}: no baseline {parts[0]!r} (known: {', '.join(known)})")
        return Method("baseline", text, float(parts[1]), parts[0], block_size=bs, segment_size=ss)
    raise ValueError(f"method {text!r}: expected dense, s2o:VARIANT:TAU, calib:FILE or BASELINE:GAMMA")


@dataclass
class Run:
    """What one method did over the calls inside ``use_method``: density and attention time."""

    method: Method
    computed: float = 0.0          # density-weighted causal blocks (sum of density * causal work)
    causal: float = 0.0            # causal work (T^2 / 2 per head per call)
    calls: int = 0
    _events: list = field(default_factory=list)
    _cpu_ms: float = 0.0
    captured: dict = field(default_factory=dict)   # layer -> (q, k, v) for "capture"
    _pending: list = field(default_factory=list)   # (computed, causal) block counts on the GPU, work of the call
    _plans: dict = field(default_factory=dict)     # sequence length -> S2O plan (built once, as a server does)

    @property
    def density(self) -> float:
        if self._pending:             # one host read for every call since the last one
            counts = torch.stack([torch.stack([c.sum(), k.sum()]) for c, k, _ in self._pending]).double().cpu()
            for (comp, caus), (_, _, work) in zip(counts.tolist(), self._pending):
                self.computed += comp / max(caus, 1.0) * work
            self._pending.clear()
        return self.computed / self.causal if self.causal else 1.0

    @property
    def attn_ms(self) -> float:
        """Total attention time (selection / index building included), milliseconds."""
        if self._events:
            torch.cuda.synchronize()
            self._cpu_ms += sum(a.elapsed_time(b) for a, b in self._events)
            self._events.clear()
        return self._cpu_ms


_ACTIVE: list[Run] = []


def _dense(q, k, v, scale):
    qq, kk, vv = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)


def _s2o(q, k, v, *, tau, variant, block_size, segment_size, scale):
    from sgl_slim.attention import s2o_attention  # noqa: PLC0415

    kw = {"variant": variant} if variant else {}
    return s2o_attention(q, k, v, tau=tau, block_size=block_size, segment_size=segment_size, sm_scale=scale,
                         return_stats=True, **kw)


def _baseline(q, k, v, *, name, gamma, block_size, segment_size, scale):
    from sgl_slim.attention import _q_tile, baselines  # noqa: PLC0415

    rank, rank_len = getattr(baselines, f"select_{name}")(q, k, gamma=gamma, block_size=block_size,
                                                          segment_size=segment_size, sm_scale=scale)
    T = q.shape[0]
    if q.is_cuda:
        from sgl_slim.attention import s2o_triton  # noqa: PLC0415

        ind = torch.tensor([0, T], dtype=torch.int32, device=q.device)
        idx = torch.arange(T, dtype=torch.int32, device=q.device)
        out, _, comp, caus = s2o_triton.s2o_paged(
            q, k, v, qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=0.0, block_size=block_size,
            segment_size=segment_size, q_tile=_q_tile(segment_size), sm_scale=scale, rank=rank,
            rank_len=rank_len, kv_contiguous=True)
        return out, {"density": float(comp.sum()) / max(float(caus.sum()), 1.0)}
    from sgl_slim.attention.s2o_ref import s2o_attention_ref  # noqa: PLC0415

    out, _, cnt = s2o_attention_ref(q, k, v, tau=0.0, block_size=block_size, segment_size=segment_size,
                                    q_tile=_q_tile(segment_size), sm_scale=scale, rank=rank, rank_len=rank_len)
    return out.to(q.dtype), {"density": float(cnt["computed"].sum()) / max(float(cnt["causal"].sum()), 1.0)}


def _s2o_served(run: Run, q, k, v, *, scale):
    """S2O as a server calls it: through the paged API, on the GPU with the plan built once per sequence length
    and reused by every layer, the block counts left on the device (no host read inside the forward; the Run
    reads them all at once).  -> (out, (computed, causal))."""
    from sgl_slim.attention import plan_paged, s2o_attention_paged  # noqa: PLC0415

    m, T = run.method, q.shape[0]
    if T not in run._plans:
        ind = torch.tensor([0, T], dtype=torch.int32, device=q.device)
        plan = plan_paged([0, T], [0, T], block_size=m.block_size, segment_size=m.segment_size,
                          device=q.device) if q.is_cuda else None
        run._plans[T] = (ind, torch.arange(T, dtype=torch.int32, device=q.device), plan)
    ind, idx, plan = run._plans[T]
    out, counts = s2o_attention_paged(q, k, v, qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=m.knob,
                                      block_size=m.block_size, segment_size=m.segment_size, sm_scale=scale,
                                      variant=m.variant, plan=plan, return_counts=True)
    return out, counts


def attend(method: Method, q, k, v, *, layer: int, scale: float, run: Run | None = None):
    """One sequence's causal attention by ``method``: q [T, Hq, D], k/v [T, Hkv, D] -> (out, density), the
    density as a float, or for S2O inside a ``Run`` as (computed, causal) block counts on q's device."""
    if method.kind in ("dense", "capture"):
        return _dense(q, k, v, scale), 1.0
    if method.kind == "s2o" and run is not None:
        return _s2o_served(run, q, k, v, scale=scale)
    if method.kind == "s2o":
        out, st = _s2o(q, k, v, tau=method.knob, variant=method.variant, block_size=method.block_size,
                       segment_size=method.segment_size, scale=scale)
        return out, st["density"]
    if method.kind == "calib":
        taus = method.calibration.layer_tau(layer)
        hkv = k.shape[1]
        G = q.shape[1] // hkv
        outs, dens = [], []
        for h in range(hkv):          # one call per KV head: its own tau (the early stop is per head anyway)
            o, st = _s2o(q[:, h * G:(h + 1) * G].contiguous(), k[:, h:h + 1].contiguous(),
                         v[:, h:h + 1].contiguous(), tau=taus[h],
                         variant=method.variant, block_size=method.block_size,
                         segment_size=method.segment_size, scale=scale)
            outs.append(o)
            dens.append(st["density"])
        return torch.cat(outs, 1), sum(dens) / hkv
    if method.kind == "baseline":
        out, st = _baseline(q, k, v, name=method.variant, gamma=method.knob, block_size=method.block_size,
                            segment_size=method.segment_size, scale=scale)
        return out, st["density"]
    raise ValueError(f"unknown method kind {method.kind!r}")


def _attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [B, Hq, T, D], key/value [B, Hkv, S, D] -> ([B, T, Hq, D], None)."""
    if not _ACTIVE:
        raise RuntimeError(f"attention {ATTN_NAME!r} called outside use_method()")
    run = _ACTIVE[-1]
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"{ATTN_NAME}: prefill only (q {query.shape[2]} rows, k {key.shape[2]}); "
                         "score answers by teacher forcing instead of generating")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{ATTN_NAME}: padding masks are not supported; pass equal-length sequences")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    layer = module.layer_idx
    outs = []
    for b in range(query.shape[0]):
        q, k, v = (x[b].transpose(0, 1) for x in (query, key, value))          # [T, H, D]
        if run.method.kind == "capture":
            run.captured[layer] = (q.contiguous(), k.contiguous(), v.contiguous())
        if q.is_cuda:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
            o, dens = attend(run.method, q, k, v, layer=layer, scale=scale, run=run)
            ev[1].record()
            run._events.append(ev)
        else:
            t0 = time.perf_counter()
            o, dens = attend(run.method, q, k, v, layer=layer, scale=scale, run=run)
            run._cpu_ms += (time.perf_counter() - t0) * 1e3
        work = q.shape[0] * (q.shape[0] + 1) / 2
        if isinstance(dens, tuple):
            run._pending.append((*dens, work))
        else:
            run.computed += dens * work
        run.causal += work
        run.calls += 1
        outs.append(o.to(query.dtype))
    return torch.stack(outs), None


def register() -> None:
    """Register the attention function and its mask function with transformers (idempotent)."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: PLC0415

    AttentionInterface.register(ATTN_NAME, _attention_fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)   # None (is_causal) when there is no padding


@contextlib.contextmanager
def use_method(model, method: Method):
    """Inside the block, every attention layer of ``model`` runs ``method``; yields the Run's record."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    run = Run(method)
    _ACTIVE.append(run)
    try:
        yield run
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(previous)
