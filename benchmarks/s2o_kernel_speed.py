"""S2O kernel speed per visited block, beside cuDNN SDPA, in ONE run (issue goal: the dense path >= 0.9x cuDNN,
and at low density a time per visited block within 1.3x of cuDNN's).

    python -m benchmarks.s2o_kernel_speed --lengths 32768,131072 --out benchmarks/results [--compare MODULE]

Paths timed (planted inputs, Llama-3.1-8B attention shape, bf16, block 128 / segment 2048):
  * ``dense_contig``: tau 0, one sequence stored in order (slots computed, not loaded);
  * ``dense_paged``: tau 0 through ``kv_indices`` (what a serving engine's page table gives: slots loaded);
  * ``ranked_all``: every earlier key through a rank array (the identity order: the gather loop of every
    ranked method, at density 1);
  * ``v3``: the planned budget at ``--taus`` (index building included), for the time per visited block at
    lower density;
  * ``v4``: the same plus the audit of the blocks it leaves out (``--audit-stages``: its loop's depths to try;
    ``--audit-fp8``: with the audit's fp8 pre-filter too; ``--audit-forms``: the audit inside the attention
    kernel (``fused``) or as kernels of its own, ``split:HEADS:KEYS:WARPS:STAGES``);
  * ``v5``: v3 with v4's audit for the tiles of the last 128 rows only.
``--paths REGEX`` keeps the paths whose name matches; ``--breakdown`` times the planned index's parts alone.
``us_per_block`` = time / visited score blocks (128 x 128, summed over heads), ``vs_cudnn`` = cuDNN's time per
causal block / ours (1.0: cuDNN's speed per block).  ``--compare MODULE`` (a module with ``s2o_paged``, e.g. a
copy of a previous kernel) runs every path with it too, side by side, and records the largest output difference.
"""

from __future__ import annotations

import importlib
import math
import re

import torch

from benchmarks.harness import time_ms
from benchmarks.s2o_frontier import BLOCK, D, SEGMENT, make_inputs, sdpa, sweep, sweep_parser
from sgl_slim.attention import s2o_triton


def run_length(kind: str, L: int, args, rows_out: list, log) -> None:
    from torch.nn.attention import SDPBackend  # noqa: PLC0415
    q, k, v = make_inputs(kind, L, "cuda")
    iters = 10 if L <= 32768 else 4
    scale = 1.0 / math.sqrt(D)
    ind = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    idx = torch.arange(L, dtype=torch.int32, device="cuda")
    n_seg = -(-L // SEGMENT)
    ident = torch.arange(L, dtype=torch.int32, device="cuda").expand(n_seg, k.shape[1], L).contiguous()
    Hq, n_tiles = q.shape[1], -(-L // 128)
    causal_blocks = Hq * sum(t + 1 for t in range(n_tiles))           # 128 x 128 blocks of the causal square
    base = {"bench": "s2o_kernel_speed", "inputs": kind, "L": L}
    t_cudnn = time_ms(lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION), warmup=2, iters=iters)
    us_cudnn = 1000 * t_cudnn / causal_blocks
    rows_out.append({**base, "method": "cudnn", "ms": t_cudnn, "us_per_block": us_cudnn})
    log(rows_out[-1])
    impls = {"current": (s2o_triton, {})}
    if args.compare:
        impls["compare"] = (importlib.import_module(args.compare), {})
    for stages in args.audit_stages:                     # the audit loop's pipelining depth (v4 paths)
        impls[f"audit_stages_{stages}"] = (s2o_triton, {"audit_stages": stages})
    if args.audit_fp8:                                   # the audit's fp8 pre-filter (v4 paths)
        impls["audit_fp8"] = (s2o_triton, {"audit_fp8": True})
    for form in args.audit_forms:                        # the audit inside the attention kernel, or split
        impls[f"audit_{form}"] = (s2o_triton, audit_form(form))
    for cfg in args.configs:                            # launch configurations of the current kernel
        warps, stages = cfg.split("x")
        impls[cfg] = (s2o_triton, {"num_warps": int(warps), "num_stages": int(stages)})
    paths = [("dense_contig", 0.0, {"kv_contiguous": True}), ("dense_paged", 0.0, {}),
             ("ranked_all", 0.0, {"kv_contiguous": True, "rank": ident})]
    paths += [("v3", tau, {"kv_contiguous": True, "stop": "planned", "local_window": 1024}) for tau in args.taus]
    paths += [("v4", tau, {"kv_contiguous": True, "stop": "planned", "local_window": 1024, "audit": True})
              for tau in args.taus]
    paths += [("v5", tau, {"kv_contiguous": True, "stop": "planned", "local_window": 1024, "audit": True,
                           "audit_last": 128}) for tau in args.taus]
    for name, tau, kw in (p for p in paths if re.search(args.paths, p[0])):
        outs = {}
        for impl, (mod, extra) in impls.items():
            if any(key.startswith("audit") for key in extra) and not kw.get("audit"):
                continue

            def call(mod=mod, tau=tau, kw={**kw, **extra}):
                return mod.s2o_paged(q, k, v, qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=tau,
                                     block_size=BLOCK, segment_size=SEGMENT, q_tile=128, sm_scale=scale, **kw)
            try:
                t = time_ms(call, warmup=2, iters=iters)
            except Exception as exc:  # noqa: BLE001 (a configuration that does not compile is a result)
                rows_out.append({**base, "method": name, "impl": impl, "knob": tau, "error": repr(exc)[:300]})
                log(rows_out[-1])
                continue
            out, _, comp, caus = call()
            outs[impl] = out, comp
            visited = comp.sum().item()                  # (128-row tile x BLOCK = 128 keys) blocks, as cuDNN's
            r = {**base, "method": name, "impl": impl, "knob": tau, "ms": t,
                 "density": (comp.sum() / caus.sum()).item(),
                 "us_per_block": 1000 * t / visited, "vs_cudnn": us_cudnn / (1000 * t / visited),
                 "speedup_vs_cudnn": t_cudnn / t}
            if impl != "current":
                r["max_diff_vs_current"] = (out.float() - outs["current"][0].float()).abs().max().item()
                r["blocks_differ_vs_current"] = (comp - outs["current"][1]).abs().sum().item()
            rows_out.append(r)
            log(r)
    if args.breakdown:
        _index_breakdown(q, k, idx, args.taus, base, rows_out, log, iters)
    del q, k, v, ident
    torch.cuda.empty_cache()


def audit_form(form: str) -> dict:
    """``fused`` (the audit inside the attention kernel) or ``split:HEADS:KEYS:WARPS:STAGES`` (its own kernels:
    q heads per program, keys per score product, warps, pipelining depth) -> s2o_paged's keywords."""
    if form == "fused":
        return {"audit_split": False}
    heads, keys, warps, stages = (int(x) for x in form.split(":")[1:])
    return {"audit_split": True, "audit_heads": heads, "audit_n": keys, "audit_warps": warps, "audit_stages": stages}


def _index_breakdown(q, k, idx, taus, base, rows_out, log, iters) -> None:
    """The planned index's parts, timed one by one: the sampled-row softmax, the ranking and budget (kernels),
    the same ranking and budget as torch ops (``s2o_ref``: the form before the kernels, same result), and the
    whole index of one call."""
    from sgl_slim.attention.s2o_ref import planned_budget, rank_by_mass  # noqa: PLC0415
    L = k.shape[0]
    scale = 1.0 / math.sqrt(D)
    seg_starts = torch.arange(-(-L // SEGMENT), device="cuda") * SEGMENT
    e = s2o_triton.sampled_mass_triton(q, k, segment_size=SEGMENT, sm_scale=scale)
    rank = rank_by_mass(e, seg_starts, 1024)
    tau_kv = torch.full((k.shape[1],), taus[0], device="cuda")
    parts = {
        "sampled_mass": lambda: s2o_triton.sampled_mass_triton(q, k, segment_size=SEGMENT, sm_scale=scale),
        "rank_and_budget": lambda: s2o_triton.rank_and_budget(e, first_seg=0, segment_size=SEGMENT, tau_kv=tau_kv,
                                                              block_size=BLOCK, local_window=1024),
        "rank_by_mass_torch": lambda: rank_by_mass(e, seg_starts, 1024),
        "planned_budget_torch": lambda: planned_budget(e, rank, seg_starts, tau_kv, BLOCK, 1024),
        "build_index": lambda: s2o_triton.build_index(
            q, k, qo_indptr=[0, L], kv_indptr=[0, L], kv_indices=idx, segment_size=SEGMENT, sm_scale=scale,
            n_rows=0, block_size=BLOCK, local_window=1024, planned_tau=tau_kv),
    }
    got = s2o_triton.rank_and_budget(e, first_seg=0, segment_size=SEGMENT, tau_kv=tau_kv, block_size=BLOCK,
                                     local_window=1024)
    same = {"rank_equal": bool(torch.equal(got[0], rank)),
            "budget_equal": bool(torch.equal(got[1], planned_budget(e, rank, seg_starts, tau_kv, BLOCK, 1024)))}
    for name, fn in parts.items():
        rows_out.append({**base, "method": "index_part", "part": name, "ms": time_ms(fn, warmup=1, iters=iters),
                         **(same if name == "rank_and_budget" else {})})
        log(rows_out[-1])


def main():
    ap = sweep_parser()
    ap.set_defaults(inputs="planted")
    ap.add_argument("--taus", type=lambda s: [float(x) for x in s.split(",")], default=[1e-1, 1e-2])
    ap.add_argument("--compare", default="", help="module with s2o_paged to time beside the current kernel")
    ap.add_argument("--configs", type=lambda s: [c for c in s.split(",") if c], default=[],
                    help="launch configurations of the current kernel to time too: WARPSxSTAGES,...")
    ap.add_argument("--breakdown", action="store_true", help="time the planned index's parts")
    ap.add_argument("--audit-stages", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="pipelining depths of the v4 audit loop to time too")
    ap.add_argument("--audit-fp8", action="store_true", help="time v4 with the audit's fp8 pre-filter too")
    ap.add_argument("--audit-forms", type=lambda s: [f for f in s.split(",") if f], default=[],
                    help="audit forms to time too: fused, split:HEADS:KEYS:WARPS:STAGES,...")
    ap.add_argument("--paths", default=".", help="regular expression: the paths to time")
    sweep(ap.parse_args(), run_length, "s2o_kernel_speed")


if __name__ == "__main__":
    main()
