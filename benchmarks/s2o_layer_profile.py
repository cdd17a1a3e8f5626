"""Where one S2O layer call's time goes on a trained model's real q/k/v (the testbed model, one long key-value
prompt), beside dense attention of the same layer.

    python -m benchmarks.s2o_layer_profile --model DIR --length 32768 --variants v4,v5 --taus 1e-2 --out F.jsonl \
        [--compare MODULE]

Per layer and setting (one JSON line each):
  sdpa_ms          torch SDPA, causal, GQA through enable_gqa (the testbed eval's dense method; the first results,
                   results/s2o_layer_profile_v4.jsonl and _v5.jsonl, repeated K/V first instead, which is slower)
  s2o_dense_ms     S2O's kernel at tau 0 (its dense path)
  gpu_ms           a call of the variant as a server makes it: plan built once per batch, no host read inside the call
                   (CUDA events, median)
  host_ms          the same call's time on the host (Python + launches, no synchronisation): when it is larger
                   than gpu_ms the GPU waits on the host
  kernels          GPU time per kernel family of one call (torch.profiler): the attention kernel, the sampled
                   mass kernels, the ranking kernels, sorting, everything else; "count": kernels launched
  impl             "current", or "compare": the same call through MODULE's ``s2o_paged`` (e.g. a copy of a
                   previous kernel module), side by side in the same run, or "audit_FORM" (``--audit-forms``: the
                   audit inside the attention kernel or as kernels of its own)
  density          visited / causal score blocks of the call
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import statistics
import time
from collections import defaultdict

import torch

from benchmarks.harness import env_info, time_ms
from sgl_slim.testbed import append_jsonl

FAMILIES = (("_s2o_fwd", "attention"), ("_s2o_audit", "audit"), ("_s2o_hits", "hits"), ("_sampled", "sampled_mass"),
            ("_mass_", "ranking"), ("sort", "sort"), ("Sort", "sort"))


def host_ms(fn, iters: int = 20) -> float:
    """Median host time of one call, without waiting for the GPU between calls (synchronised before and after
    the whole loop; a call that launches faster than the GPU runs it measures its launch cost only)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def kernel_families(fn) -> dict[str, float]:
    """GPU milliseconds per kernel family of one call of ``fn`` (torch.profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        family = next((f for key, f in FAMILIES if key in ev.name), "other")
        out[family] += ev.device_time_total / 1e3
    out["count"] = sum(1 for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA)
    return {k: round(v, 4) for k, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--taus", default="1e-2,3e-2")
    ap.add_argument("--variants", default="v4")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", default="", help="module with s2o_paged to time beside the current one")
    ap.add_argument("--audit-forms", default="", help="audit forms to time beside the current call (fused, "
                    "split:HEADS:KEYS:WARPS:STAGES; benchmarks.s2o_kernel_speed.audit_form)")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer  # noqa: PLC0415

    from benchmarks.s2o_kernel_speed import audit_form  # noqa: PLC0415
    from sgl_slim.attention import plan_paged, s2o_attention_paged, s2o_triton  # noqa: PLC0415
    from sgl_slim.attention.s2o_ref import VARIANTS  # noqa: PLC0415
    from sgl_slim.testbed.attn import _dense  # noqa: PLC0415
    from sgl_slim.testbed.dump import capture_qkv, long_prompt  # noqa: PLC0415
    from sgl_slim.testbed.model import load_model  # noqa: PLC0415

    model = load_model(args.model, device="cuda")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    qkv = capture_qkv(model, long_prompt(tokenizer, args.length).cuda())
    rows = [{"bench": "s2o_layer_profile", "env": env_info(), "model": args.model, "length": args.length}]
    L = args.length
    indptr = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    idx = torch.arange(L, dtype=torch.int32, device="cuda")
    plan = plan_paged([0, L], [0, L], device="cuda")
    if args.compare:
        other = importlib.import_module(args.compare)
        other_plan = other.plan_paged([0, L], [0, L], block_size=128, segment_size=2048, q_tile=128, device="cuda")
    for layer in sorted(qkv):
        q, k, v = (x.cuda().to(torch.bfloat16).contiguous() for x in qkv[layer])
        scale = 1.0 / math.sqrt(q.shape[-1])
        base = {"bench": "s2o_layer_profile", "layer": layer, "length": L, "hq": q.shape[1], "hkv": k.shape[1]}

        def call(tau, variant="v4"):
            return s2o_attention_paged(q, k, v, qo_indptr=indptr, kv_indptr=indptr, kv_indices=idx, tau=tau,
                                       variant=variant, plan=plan, return_counts=True)

        def call_other(tau, variant="v4"):
            out, _, computed, causal = other.s2o_paged(
                q, k, v, qo_indptr=indptr, kv_indptr=indptr, kv_indices=idx, tau=tau, block_size=128,
                segment_size=2048, q_tile=128, sm_scale=scale, plan=other_plan, **VARIANTS[variant])
            return out, (computed, causal)

        def call_form(tau, variant="v4", form="fused"):
            out, _, computed, causal = s2o_triton.s2o_paged(
                q, k, v, qo_indptr=indptr, kv_indptr=indptr, kv_indices=idx, tau=tau, block_size=128,
                segment_size=2048, q_tile=128, sm_scale=scale, plan=plan, **VARIANTS[variant], **audit_form(form))
            return out, (computed, causal)

        impls = {"current": call, **({"compare": call_other} if args.compare else {})}
        for form in (f for f in args.audit_forms.split(",") if f):
            impls[f"audit_{form}"] = functools.partial(call_form, form=form)
        row = dict(base, sdpa_ms=time_ms(lambda: _dense(q, k, v, scale)), s2o_dense_ms=time_ms(lambda: call(0.0)))
        rows.append(row)
        print(json.dumps(row), flush=True)
        for variant in args.variants.split(","):
            for tau in (float(t) for t in args.taus.split(",")):
                for impl, fn in impls.items():           # "current" first: the compare row's reference
                    out, (computed, causal) = fn(tau, variant)
                    row = dict(base, impl=impl, variant=variant, tau=tau,
                               density=round(float(computed.sum()) / max(1, int(causal.sum())), 4),
                               gpu_ms=time_ms(lambda: fn(tau, variant)), host_ms=host_ms(lambda: fn(tau, variant)),
                               kernels=kernel_families(lambda: fn(tau, variant)))
                    if impl == "current":
                        ref = out.float()
                    else:
                        row["rel_l2_vs_current"] = round(((out.float() - ref).norm() / ref.norm()).item(), 6)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        append_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
