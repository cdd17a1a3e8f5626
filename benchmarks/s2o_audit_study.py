"""Can S2O v4's audit be made cheaper with fewer dimensions?  A CPU study (fp32; no kernel, no timing).

    python -m benchmarks.s2o_audit_study --inputs planted --length 8192 --out benchmarks/results
    python -m benchmarks.s2o_audit_study --inputs QKV.pt --layers 1,2,4 --length 16384 --out benchmarks/results

(results: ``s2o_audit_study_planted.jsonl`` / ``s2o_audit_study_testbed.jsonl``)

(``QKV.pt``: real activations, ``python -m sgl_slim.testbed.dump --model DIR --length 16384 --save QKV.pt``.)

The audit (``s2o_ref``, module doc) computes q.k for every (query row, key) of the ranked blocks the planned
budget leaves out and visits a block if a score exceeds the row's threshold T_r = ln(mass after the plan) +
ln tau.  It costs nearly what attending costs (benchmarks/s2o.md, "S2O v4").  Per KV head, with the group's
query rows, this study counts, over every (q head, 128-row tile, audited block):
  * ``hits``: the exact audit's verdicts (the blocks v4 visits);
  * ``bound_d``: a guaranteed upper bound from d of the 128 dimensions, so the exact test would only run on the
    blocks it passes: q.k = q.mu + q_D.k'_D + q_R.k'_R <= q.mu + q_D.k'_D + |q_R| |k'_R| (k' = k - mu, mu the
    head's mean key; D = the d dimensions with the largest E[q_d^2] E[k'_d^2]), plus a rounding allowance of
    2^-7 |q| max|k'|.  It never misses a hit (asserted); the question is how many blocks it lets through;
  * ``bound_norm`` / ``bound_centroid``: guaranteed bounds from whole keys, one number per block and row:
    q.k <= |q| max|k| (Cauchy-Schwarz), and q.k <= q.c + |q| max|k - c| (c the block's mean key), each with the
    same rounding allowance;
  * ``approx_d_cS``: an estimate instead of a bound: q.mu + q_D.k'_D + q_R.mean(k'_R) + S sigma, sigma^2 =
    sum_{d in R} q_d^2 var(k'_d).  Reported: blocks it flags and the share of the exact hits among them (recall).
  * ``fp8_cS``: the kernel's fp8 pre-filter (``s2o_triton.fp8_audit_operands``: q and K rounded to e4m3 with a
    per-row / per-head scale) with a margin of S standard deviations of its rounding error: blocks it lists (the
    kernel tests them again exactly) and the share of the exact hits among them (a miss is a hit it did not
    list); ``fp8_max_sigmas``: the largest rounding error seen, in those standard deviations.
Planned budget as in v3 / v4: 32 strided rows per 2048-row segment, the 1024-key window, block 128.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.harness import write_results
from sgl_slim.attention.s2o_ref import planned_budget, rank_by_mass, sampled_mass
from sgl_slim.attention.s2o_triton import fp8_audit_operands

BLOCK, SEGMENT, TILE, WINDOW = 128, 2048, 128, 1024
ROUNDING = 2.0 ** -7


def _tile_any(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[G, R, n_blocks * BLOCK] bool -> [G, tiles, n_blocks]: any over the tile's rows and the block's keys."""
    G, R, _ = x.shape
    x = x.view(G, R, n_blocks, BLOCK).any(-1)
    n_tiles = -(-R // TILE)
    x = torch.nn.functional.pad(x, (0, 0, 0, n_tiles * TILE - R))
    return x.view(G, n_tiles, TILE, n_blocks).any(2)


def study(q: torch.Tensor, k: torch.Tensor, tau: float, dims: list[int], sigmas: list[float],
          fp8_sigmas: tuple[float, ...] = ()) -> dict:
    """Counts over every KV head and segment of one layer (module doc).  q [T, Hq, D], k [T, Hkv, D]."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D)
    if fp8_sigmas:
        q8, qs, k8, k8s, sig = fp8_audit_operands(q.bfloat16(), k.bfloat16(), sigmas=1.0)
        q8 = q8.float() * qs[..., None]
        k8 = k8.float() * k8s[:, None]
    seg_starts = torch.arange(-(-T // SEGMENT)) * SEGMENT
    e = sampled_mass(q, k, segment_size=SEGMENT, sm_scale=scale)
    rank = rank_by_mass(e, seg_starts, WINDOW)
    n_plan = planned_budget(e, rank, seg_starts, torch.full((Hkv,), tau), BLOCK, WINDOW)
    out = {"audited": 0, "hits": 0}
    for h in range(Hkv):
        kh, qg = k[:, h].float(), q[:, h * G:(h + 1) * G].float()
        mu = kh.mean(0)
        kc = kh - mu
        order = ((qg ** 2).mean((0, 1)) * (kc ** 2).mean(0)).argsort(descending=True)
        kc_max = kc.norm(dim=-1).max()
        for s in range(1, len(seg_starts)):
            st, end = s * SEGMENT, min(T, (s + 1) * SEGMENT)
            rows = torch.arange(st, end)
            qr = qg[rows].transpose(0, 1)                                            # [G, R, D]
            sc = (qr @ kh[:end].T * scale).masked_fill(torch.arange(end) > rows[:, None], -math.inf)
            plan = torch.zeros(end, dtype=torch.bool)
            plan[rank[s, h, :int(n_plan[s, h])].long()] = True
            plan[st:] = True
            thr = (torch.logsumexp(sc.masked_fill(~plan, -math.inf), -1) + math.log(tau))[..., None]
            b0, b1 = int(n_plan[s, h]) // BLOCK, st // BLOCK
            if b1 <= b0:
                continue
            idx = rank[s, h, b0 * BLOCK:b1 * BLOCK].long()
            exact = _tile_any(sc[:, :, idx] > thr, b1 - b0)
            out["audited"] += exact.numel()
            out["hits"] += int(exact.sum())
            if fp8_sigmas:
                q8r = q8[rows, h * G:(h + 1) * G].transpose(0, 1)
                approx = q8r @ k8[idx, h].T * scale
                sig_r = (sig[rows, h * G:(h + 1) * G].T * scale)[..., None]
                err = (approx - (qr.bfloat16().float() @ k[idx, h].bfloat16().float().T) * scale).abs() / sig_r
                out["fp8_max_sigmas"] = max(out.get("fp8_max_sigmas", 0.0), round(float(err.max()), 3))
                for c in fp8_sigmas:
                    listed = _tile_any(approx > thr - c * sig_r, b1 - b0)
                    key = f"fp8_c{c:g}"
                    out[key] = out.get(key, 0) + int(listed.sum())
                    out[key + "_hits"] = out.get(key + "_hits", 0) + int((listed & exact).sum())
            kb = kh[idx].view(b1 - b0, BLOCK, D)
            cen = kb.mean(1)                                                         # [blocks, D]
            qn = qr.norm(dim=-1, keepdim=True)
            slack = ROUNDING * qn * kc_max
            whole = {"bound_norm": qn * kb.norm(dim=-1).amax(1) + slack,
                     "bound_centroid": qr @ cen.T + qn * (kb - cen[:, None]).norm(dim=-1).amax(1) + slack}
            for key, bound in whole.items():                                          # [G, R, blocks]
                passed = _tile_any((bound * scale > thr).repeat_interleave(BLOCK, -1), b1 - b0)
                assert bool((passed | ~exact).all()), f"{key} missed an exact hit"
                out[key] = out.get(key, 0) + int(passed.sum())
            base = (qr @ mu)[..., None]
            for d in dims:
                keep, rest = order[:d], order[d:]
                part = qr[..., keep] @ kc[idx][:, keep].T
                bound = part + qr[..., rest].norm(dim=-1, keepdim=True) * kc[idx][:, rest].norm(dim=-1) \
                    + base + ROUNDING * qr.norm(dim=-1, keepdim=True) * kc_max
                passed = _tile_any(bound * scale > thr, b1 - b0)
                assert bool((passed | ~exact).all()), "the bound missed an exact hit"
                out[f"bound_{d}"] = out.get(f"bound_{d}", 0) + int(passed.sum())
                sigma = (qr[..., rest] ** 2 @ kc[:, rest].var(0, unbiased=False)).sqrt()[..., None]
                mean_rest = (qr[..., rest] @ kc[:, rest].mean(0))[..., None]
                for c in sigmas:
                    flagged = _tile_any((part + base + mean_rest + c * sigma) * scale > thr, b1 - b0)
                    key = f"approx_{d}_c{c:g}"
                    out[key] = out.get(key, 0) + int(flagged.sum())
                    out[key + "_hits"] = out.get(key + "_hits", 0) + int((flagged & exact).sum())
    return out


def _layers(inputs: str, length: int, wanted: list[int] | None) -> dict[int, tuple]:
    if inputs in ("planted", "mixed"):
        from benchmarks.s2o_frontier import make_inputs  # noqa: PLC0415
        q, k, _ = make_inputs(inputs, length, "cpu")
        return {0: (q.float(), k.float())}
    saved = torch.load(inputs)
    return {i: (saved["q"][i][:length].float(), saved["k"][i][:length].float()) for i in range(len(saved["q"]))
            if wanted is None or i in wanted}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", default="planted", help="planted, mixed, or a saved q/k/v file (testbed.dump --save)")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--layers", default=None, help="layers of a saved file (default all)")
    ap.add_argument("--taus", default="1e-2")
    ap.add_argument("--dims", default="16,32,64")
    ap.add_argument("--sigmas", default="0,1,2")
    ap.add_argument("--fp8-sigmas", default="", help="margins of the fp8 pre-filter to count, e.g. 1.5,2,3,4")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    wanted = [int(x) for x in args.layers.split(",")] if args.layers else None
    dims = [int(x) for x in args.dims.split(",")]
    sigmas = [float(x) for x in args.sigmas.split(",")]
    source = args.inputs if args.inputs in ("planted", "mixed") else "testbed"
    fp8 = tuple(float(x) for x in args.fp8_sigmas.split(",") if x)
    rows = []
    for layer, (q, k) in _layers(args.inputs, args.length, wanted).items():
        for tau in (float(x) for x in args.taus.split(",")):
            t0 = time.perf_counter()
            row = {"bench": "s2o_audit_study", "inputs": source, "length": q.shape[0], "layer": layer, "tau": tau,
                   **study(q, k, tau, dims, sigmas, fp8), "s": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    path = Path(args.out) / f"s2o_audit_study_{source}{'_fp8' if fp8 else ''}.jsonl"
    write_results(path, rows)


if __name__ == "__main__":
    main()
