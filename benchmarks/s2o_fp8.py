"""S2O over an fp8 KV cache vs the bf16 cache, on the GPU, in one run: time, density and error at equal settings.

    python -m benchmarks.s2o_fp8 --lengths 32768,131072 --out benchmarks/results

Inputs: ``make_qkv`` (planted), Llama-3.1-8B attention shape (32 q / 8 KV heads, d 128), queries in bf16.  The
fp8 cache holds K / k_scale and V / v_scale in float8_e4m3fn with one scale per tensor, amax / 448 (what a
checkpoint's calibrated KV scales give; SGLang without them uses 1.0).  Error: rel-L2 of ``--rows`` sampled rows
against exact fp32 attention of the ORIGINAL bf16 K/V (so the fp8 rows include the cache's own rounding), and
against exact attention of the dequantised cache (the kernel's error alone).  cuDNN SDPA on the bf16 cache is
timed beside them.  Times: median CUDA-event ms, index building included.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

from benchmarks.harness import time_ms, write_results
from benchmarks.s2o_frontier import BLOCK, D, HKV, HQ, SEGMENT, exact_rows, rel_l2, sdpa
from sgl_slim.attention import VARIANTS, s2o_triton
from sgl_slim.attention.inputs import make_qkv

E4M3_MAX = 448.0
SETTINGS = [("dense", 0.0), ("v4", 1e-2), ("v5", 1e-2), ("v2", 1e-3)]     # v4 at 1e-2: the default


def fp8_cache(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    scale = x.float().abs().amax().item() / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def run_length(L: int, n_rows: int, log) -> None:
    dev = "cuda"
    q, k, v = make_qkv(L, HQ, HKV, D, seed=1, dtype=torch.bfloat16, device=dev)
    k8, ks = fp8_cache(k)
    v8, vs = fp8_cache(v)
    kd, vd = (k8.float() * ks).bfloat16(), (v8.float() * vs).bfloat16()
    rows = torch.randperm(L, generator=torch.Generator().manual_seed(0))[:n_rows].sort().values.to(dev)
    ref = exact_rows(q, k, v, rows)
    ref_deq = exact_rows(q, kd, vd, rows)
    ind = torch.tensor([0, L], dtype=torch.int32, device=dev)
    idx = torch.arange(L, dtype=torch.int32, device=dev)
    iters = 10 if L <= 32768 else 4
    base = {"bench": "s2o_fp8", "L": L, "rows": n_rows, "k_scale": ks, "v_scale": vs}
    t = time_ms(lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION), warmup=2, iters=iters)
    log({**base, "method": "cudnn", "kv": "bf16", "ms": t, "density": 1.0,
         "rel_l2": rel_l2(sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)[rows], ref)})
    for variant, tau in SETTINGS:
        settings = {} if variant == "dense" else VARIANTS[variant]
        for kv, (kk, vv, sk, sv) in (("bf16", (k, v, 1.0, 1.0)), ("fp8_e4m3", (k8, v8, ks, vs))):
            def call(kk=kk, vv=vv, sk=sk, sv=sv):
                return s2o_triton.s2o_paged(q, kk, vv, qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=tau,
                                            block_size=BLOCK, segment_size=SEGMENT, q_tile=128,
                                            sm_scale=1.0 / math.sqrt(D), kv_contiguous=True, k_scale=sk,
                                            v_scale=sv, **settings)
            t = time_ms(call, warmup=1, iters=iters)
            out, _, comp, caus = call()
            log({**base, "method": f"s2o_{variant}", "tau": tau, "kv": kv, "ms": t,
                 "density": (comp.sum() / caus.sum()).item(), "rel_l2": rel_l2(out[rows], ref),
                 "rel_l2_vs_dequantised": rel_l2(out[rows], ref_deq) if kv != "bf16" else None})
    del q, k, v, k8, v8, kd, vd
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--rows", type=int, default=193)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out_rows = []

    def log(r):
        print({k: (round(x, 5) if isinstance(x, float) else x) for k, x in r.items()}, flush=True)
        out_rows.append(r)

    for L in (int(x) for x in args.lengths.split(",")):
        run_length(L, args.rows, log)
    print(write_results(Path(args.out) / "s2o_fp8.jsonl", out_rows))


if __name__ == "__main__":
    main()
