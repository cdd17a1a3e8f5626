"""S2O frontier on the GPU: error vs density vs time for S2O v1, the v2 variants, the in-tree baselines and
the token oracle, beside cuDNN and FlashAttention-2 SDPA, on two independent input generators, in ONE run.

    python -m benchmarks.s2o_frontier --lengths 32768,131072 --inputs planted,mixed --out benchmarks/results

Inputs: ``make_qkv`` (planted: sinks, verticals, local, slash) and ``make_qkv_mixed`` (head types drawn per
head, nonzero value mean), Llama-3.1-8B attention shape (32 q heads, 8 KV heads, d 128, bf16, causal).
Error: rel-L2 over ``--rows`` sampled query rows (seeded, the same for every method; ``rel_l2_last``: over the
last LAST_ROWS rows, the ones the first generated token reads) against exact fp32
attention of those rows.  Density: computed / causal score blocks (S2O, baselines; the oracle counts
tokens).  Times: median CUDA-event ms (S2O includes its index building; baselines include their selection).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import env_info, time_ms, write_results
from sgl_slim.attention import baselines, s2o_triton
from sgl_slim.attention.inputs import make_qkv

HQ, HKV, D = 32, 8, 128
BLOCK, SEGMENT = 128, 2048

# name -> (s2o_paged settings, taus)
S2O_METHODS = {
    "s2o_v1": ({"stop": "block"}, [1e-2, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5]),
    "s2o_v2": ({"stop": "remaining", "compensate": True}, [0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3]),
    "s2o_v2_nocomp": ({"stop": "remaining"}, [0.1, 3e-2, 1e-2, 3e-3, 1e-3]),
    "s2o_v2_estimate": ({"stop": "remaining", "compensate": True, "tail_estimate": "estimate"},
                        [0.3, 0.1, 3e-2, 1e-2, 3e-3]),
    "s2o_v2_local1024": ({"stop": "remaining", "compensate": True, "local_window": 1024},
                         [0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3]),
    # v3: budget planned from the exact softmax of 32 sampled rows per segment (tau = estimated dropped share)
    "s2o_v3": ({"stop": "planned"}, [0.1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4]),
    "s2o_v3_local1024": ({"stop": "planned", "local_window": 1024}, [0.1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4]),
    "s2o_v3_max": ({"stop": "planned", "mass_reduce": "max"}, [1.0, 0.3, 0.1, 3e-2, 1e-2, 3e-3]),
    "s2o_v3_max_local1024": ({"stop": "planned", "mass_reduce": "max", "local_window": 1024},
                             [1.0, 0.3, 0.1, 3e-2, 1e-2, 3e-3]),
    "s2o_v3_s128": ({"stop": "planned", "samples": 128}, [3e-2, 1e-2, 3e-3, 1e-3, 3e-4]),
    # v4: v3 (window 1024) + the audit of the blocks its budget leaves out
    "s2o_v4": ({"stop": "planned", "local_window": 1024, "audit": True}, [0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3]),
    "s2o_v5": ({"stop": "planned", "local_window": 1024, "audit": True, "audit_last": 128},
               [0.1, 3e-2, 1e-2, 3e-3, 1e-3]),
    "s2o_v4_fp8audit": ({"stop": "planned", "local_window": 1024, "audit": True, "audit_fp8": True},
                        [0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3]),
}
CUM_GAMMAS = [0.9, 0.95, 0.99, 0.999]
VS_GAMMAS = [0.9, 0.95, 0.99]
ORACLE_MASS = [0.99, 0.997]
LAST_ROWS = 64      # rel_l2_last: the error of the sequence's last rows (what v5's audit covers)


def make_inputs(kind: str, L: int, device: str):
    if kind == "planted":
        return make_qkv(L, HQ, HKV, D, seed=1, dtype=torch.bfloat16, device=device)
    from sgl_slim.attention.inputs_mixed import make_qkv_mixed  # noqa: PLC0415
    return make_qkv_mixed(L, HQ, HKV, D, seed=1, dtype=torch.bfloat16, device=device)


def exact_rows(q, k, v, rows: torch.Tensor) -> torch.Tensor:
    """Exact fp32 causal attention of the query rows ``rows`` [R] -> [R, Hq, D]."""
    G = q.shape[1] // k.shape[1]
    out = []
    for h0 in range(0, q.shape[1], 8):
        qs = q[rows, h0:h0 + 8].float().transpose(0, 1)                          # [8, R, D]
        ks = k[:, h0 // G:(h0 + 8) // G].float().repeat_interleave(G, 1)[:, :8].transpose(0, 1)
        vs = v[:, h0 // G:(h0 + 8) // G].float().repeat_interleave(G, 1)[:, :8].transpose(0, 1)
        s = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[2])                       # [8, R, L]
        s = s.masked_fill(torch.arange(k.shape[0], device=q.device)[None, None, :] > rows[None, :, None],
                          -math.inf)
        out.append((torch.softmax(s, -1) @ vs).transpose(0, 1))
    return torch.cat(out, 1)


def rel_l2(o, ref):
    return ((o.float() - ref).norm() / ref.norm()).item()


def sdpa(q, k, v, backend):
    qq, kk, vv = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    with sdpa_kernel(backend):
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)


def run_length(kind, L, args, rows_out, log):
    dev = "cuda"
    q, k, v = make_inputs(kind, L, dev)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.randperm(L, generator=gen)[:args.rows].sort().values.to(dev)
    ref = exact_rows(q, k, v, rows)
    last = torch.arange(L - LAST_ROWS, L, device=dev)          # the rows the first generated token reads
    ref_last = exact_rows(q, k, v, last)
    iters = 10 if L <= 32768 else 4
    scale = 1.0 / math.sqrt(D)
    ind = torch.tensor([0, L], dtype=torch.int32, device=dev)
    idx = torch.arange(L, dtype=torch.int32, device=dev)
    base = {"bench": "s2o_frontier", "inputs": kind, "L": L, "rows": args.rows}

    def emit(out=None, **r):
        r = {**base, **r}
        if out is not None:
            r["rel_l2_last"] = rel_l2(out[last], ref_last)
        rows_out.append(r)
        log(r)

    for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)]:
        t = time_ms(lambda: sdpa(q, k, v, be), warmup=2, iters=iters)
        o = sdpa(q, k, v, be)
        emit(o, method=name, knob=None, ms=t, density=1.0, rel_l2=rel_l2(o[rows], ref))

    def kernel(tau, rank=None, rank_len=None, **settings):
        return s2o_triton.s2o_paged(q, k, v, qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=tau,
                                    block_size=BLOCK, segment_size=SEGMENT, q_tile=128, sm_scale=scale,
                                    rank=rank, rank_len=rank_len, kv_contiguous=True, **settings)

    t = time_ms(lambda: kernel(0.0), warmup=2, iters=iters)
    out, _, comp, caus = kernel(0.0)
    emit(out, method="s2o_dense", knob=0.0, ms=t, density=1.0, rel_l2=rel_l2(out[rows], ref))
    t_idx = time_ms(lambda: s2o_triton.build_index(q, k, v, qo_indptr=[0, L], kv_indptr=[0, L], kv_indices=idx,
                                                   segment_size=SEGMENT, sm_scale=scale, n_rows=0,
                                                   block_size=BLOCK, compensate=True), warmup=1, iters=iters)
    emit(method="s2o_index_only", knob=None, ms=t_idx, density=None, rel_l2=None)
    for name, (settings, taus) in S2O_METHODS.items():
        if not args.methods.search(name):
            continue
        for tau in taus:
            t = time_ms(lambda: kernel(tau, **settings), warmup=1, iters=iters)
            out, _, comp, caus = kernel(tau, **settings)
            emit(out, method=name, knob=tau, ms=t, density=(comp.sum() / caus.sum()).item(),
                 rel_l2=rel_l2(out[rows], ref))
    sels = [("cumulative_blocks", g, lambda g=g: baselines.select_cumulative_blocks(
                q, k, gamma=g, block_size=BLOCK, segment_size=SEGMENT, sm_scale=scale)) for g in CUM_GAMMAS]
    sels += [("vertical_slash", g, lambda g=g: baselines.select_vertical_slash(
                q, k, gamma=g, block_size=BLOCK, segment_size=SEGMENT, sm_scale=scale)) for g in VS_GAMMAS]
    sels += [("pbs", g, lambda g=g: baselines.select_pbs(q, k, gamma=g, block_size=BLOCK, segment_size=SEGMENT,
                                                         sm_scale=scale)) for g in (0.99, 0.999)]
    for name, g, sel in sels:
        if not args.methods.search(name):
            continue
        try:
            t_sel = time_ms(sel, warmup=1, iters=min(iters, 3))
            rank, rank_len = sel()
            t = time_ms(lambda: kernel(0.0, rank=rank, rank_len=rank_len), warmup=1, iters=iters)
            out, _, comp, caus = kernel(0.0, rank=rank, rank_len=rank_len)
            emit(out, method=name, knob=g, ms=t + t_sel, kernel_ms=t, select_ms=t_sel,
                 density=(comp.sum() / caus.sum()).item(), rel_l2=rel_l2(out[rows], ref))
            del rank, rank_len
        except Exception:  # noqa: BLE001 (record the failure of one baseline, go on with the others)
            emit(method=name, knob=g, error=traceback.format_exc()[-800:])
    if L <= args.oracle_max:
        for mass in ORACLE_MASS:
            dens, out = baselines.token_oracle(q, k, v, mass=mass, segment_size=SEGMENT, sm_scale=scale)
            emit(out, method="token_oracle", knob=mass, ms=None, density=dens, rel_l2=rel_l2(out[rows], ref))
    del q, k, v
    torch.cuda.empty_cache()


def sweep_parser() -> argparse.ArgumentParser:
    """The arguments ``sweep`` reads: --lengths, --inputs, --rows (evaluated query rows), --out."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--inputs", default="planted,mixed")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results")
    return ap


def main():
    ap = sweep_parser()
    ap.add_argument("--oracle-max", type=int, default=131072)
    ap.add_argument("--methods", default=".", help="regular expression: the S2O variants and baselines to run")
    args = ap.parse_args()
    args.methods = re.compile(args.methods)
    sweep(args, run_length, "s2o_frontier")


def sweep(args, run, bench: str) -> None:
    """``run(kind, L, args, rows, log)`` for every input kind x length of ``args``; the rows (and a failed
    length's traceback) are written to ``args.out``/``bench``.jsonl after each length."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(r):
        print(f"[{time.time() - t0:6.1f}s] " + json.dumps(r), flush=True)

    rows: list = []
    for kind in args.inputs.split(","):
        for L in [int(x) for x in args.lengths.split(",")]:
            try:
                run(kind, L, args, rows, log)
            except Exception:  # noqa: BLE001 (keep what was measured; the traceback is recorded)
                traceback.print_exc()
                rows.append({"bench": bench, "inputs": kind, "L": L, "error": traceback.format_exc()})
            write_results(out / f"{bench}.jsonl", rows, env=env_info())


if __name__ == "__main__":
    main()
