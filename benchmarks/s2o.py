"""S2O benchmarks on the GPU: quality (error vs density) and speed (vs cuDNN / FlashAttention-2 SDPA).

    python -m benchmarks.s2o --quality 8192,32768 --speed 8192,32768,65536,131072 --out benchmarks/results

Quality: inputs from sgl_slim.attention.inputs.make_qkv (Llama-3.1-8B attention shape: 32 q heads,
8 KV heads, d 128, bf16); every method runs the SAME Triton kernel in bf16 and is compared with fp32
dense attention (rel-L2 = ||o - o_ref|| / ||o_ref||, MSE = mean (o - o_ref)^2).  S2O sweeps tau, the
baselines sweep gamma (top-cdf).  Speed: median CUDA-event time of 20 runs after warm-up; S2O time
includes the index building, which is also timed alone.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import env_info, time_ms, write_results
from sgl_slim.attention import baselines, s2o_triton
from sgl_slim.attention.inputs import make_qkv
from sgl_slim.attention.s2o_ref import RECENT

HQ, HKV, D = 32, 8, 128
TAUS = [0.0, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
GAMMAS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995]


def sdpa(q, k, v, backend=None):
    # q [T, Hq, D] -> [1, Hq, T, D]; GQA via enable_gqa
    qq, kk, vv = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    if backend is None:
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
    else:
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)


def dense_fp32(q, k, v):
    """fp32 ground truth (memory-efficient SDPA in fp32, GQA expanded), chunked over heads."""
    G = q.shape[1] // k.shape[1]
    outs = []
    for h0 in range(0, q.shape[1], 8):
        qs = q[:, h0:h0 + 8].float()
        ks = k.float().repeat_interleave(G, 1)[:, h0:h0 + 8]
        vs = v.float().repeat_interleave(G, 1)[:, h0:h0 + 8]
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            outs.append(F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                                       vs.transpose(0, 1)[None], is_causal=True)[0]
                        .transpose(0, 1))
    return torch.cat(outs, 1)


def errors(o, ref):
    d = o.float() - ref
    return {"rel_l2": (d.norm() / ref.norm()).item(), "mse": d.pow(2).mean().item()}


def run_method(q, k, v, *, method, knob, block_size, segment_size, q_tile=128, group_reduce="max",
               n_sample=0, recent=RECENT, num_warps=None, num_stages=None):
    """One launch of the shared kernel.  Returns out, density."""
    T = q.shape[0]
    ind = torch.tensor([0, T], dtype=torch.int32, device=q.device)
    idx = torch.arange(T, dtype=torch.int32, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[2])
    rank = rank_len = None
    tau = knob
    if method == "s2o":
        rank = s2o_triton.build_rank(q, k, qo_indptr=[0, T], kv_indptr=[0, T], kv_indices=idx,
                                     segment_size=segment_size, sm_scale=scale, n_rows=0, n_sample=n_sample,
                                     recent=recent, group_reduce=group_reduce)
    elif method in ("pbs", "topcdf"):
        sel = baselines.select_pbs if method == "pbs" else baselines.select_topcdf
        rank, rank_len = sel(q, k, gamma=knob, block_size=block_size, segment_size=segment_size, sm_scale=scale)
        tau = 0.0
    out, _, comp, caus = s2o_triton.s2o_paged(q, k, v, qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=tau,
                                              block_size=block_size, segment_size=segment_size, q_tile=q_tile,
                                              sm_scale=scale, rank=rank, rank_len=rank_len,
                                              num_warps=num_warps, num_stages=num_stages, kv_contiguous=True)
    return out, (comp.sum() / caus.sum()).item()


def quality(lengths, rows, log):
    for L in lengths:
        q, k, v = make_qkv(L, HQ, HKV, D, seed=1, dtype=torch.bfloat16, device="cuda")
        ref = dense_fp32(q, k, v)
        rows.append({"bench": "s2o_quality", "L": L, "method": "dense_cudnn_bf16", "knob": None, "density": 1.0,
                     **errors(sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION), ref)})
        # (method, knobs, block, segment, group_reduce, n_sample, recent)
        configs = [("s2o", TAUS, 64, 512, "max", 0, RECENT), ("pbs", GAMMAS, 64, 512, "max", 0, 0),
                   ("topcdf", GAMMAS, 64, 512, "max", 0, 0), ("s2o", TAUS, 64, 1024, "max", 0, RECENT),
                   ("s2o", TAUS, 64, 2048, "max", 0, RECENT), ("s2o", TAUS, 128, 512, "max", 0, RECENT),
                   ("s2o", TAUS, 128, 2048, "max", 0, RECENT), ("pbs", GAMMAS, 128, 512, "max", 0, 0)]
        if L == lengths[0]:  # ablations at the first length
            configs += [("s2o", TAUS, 64, 256, "max", 0, RECENT),
                        ("pbs", GAMMAS, 64, 2048, "max", 0, 0),
                        ("s2o", TAUS, 32, 512, "max", 0, RECENT), ("s2o", TAUS, 64, 512, "mean", 0, RECENT),
                        ("s2o", TAUS, 64, 512, "max", 0, 128), ("s2o", TAUS, 64, 512, "max", 0, 512),
                        ("s2o", TAUS, 64, 512, "max", 4, RECENT), ("s2o", TAUS, 64, 512, "max", 16, RECENT),
                        ("topcdf", GAMMAS, 128, 512, "max", 0, 0)]
        for method, knobs, bs, ss, gr, ns, rc in configs:
            for knob in knobs:
                out, dens = run_method(q, k, v, method=method, knob=knob, block_size=bs, segment_size=ss,
                                       group_reduce=gr, n_sample=ns, recent=rc)
                r = {"bench": "s2o_quality", "L": L, "method": method, "knob": knob, "block_size": bs,
                     "segment_size": ss, "group_reduce": gr, "n_sample": ns, "recent": rc, "density": dens,
                     **errors(out, ref)}
                rows.append(r)
                log(r)
        del q, k, v, ref
        torch.cuda.empty_cache()


def speed(lengths, rows, log, taus, gammas, tune, configs=None):
    scale = 1.0 / math.sqrt(D)
    for L in lengths:
        q, k, v = make_qkv(L, HQ, HKV, D, seed=1, dtype=torch.bfloat16, device="cuda")
        ref = dense_fp32(q, k, v) if L <= 65536 else None
        ref = ref if ref is not None else sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION).float()
        ref_kind = "fp32" if L <= 65536 else "cudnn_bf16"
        iters = 20 if L <= 32768 else 5
        for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)]:
            t = time_ms(lambda: sdpa(q, k, v, be), warmup=2, iters=iters)
            r = {"bench": "s2o_speed", "L": L, "method": name, "ms": t, "density": 1.0, "ref": ref_kind,
                 **errors(sdpa(q, k, v, be), ref)}
            rows.append(r)
            log(r)
        ind = torch.tensor([0, L], dtype=torch.int32, device="cuda")
        idx = torch.arange(L, dtype=torch.int32, device="cuda")
        configs = list(configs or [(64, 512, 128, None, None), (64, 2048, 128, None, None),
                                   (128, 2048, 128, None, None)])
        if tune and L == 32768:
            configs += [(64, 512, 128, 4, 1), (64, 512, 128, 8, 1), (64, 512, 128, 4, 3), (128, 512, 128, 8, 2),
                        (64, 512, 64, 4, 2)]
        for bs, ss, qt, nw, ns in configs:
            # index building alone
            t_idx = time_ms(lambda: s2o_triton.build_rank(q, k, qo_indptr=[0, L], kv_indptr=[0, L], kv_indices=idx,
                                                          segment_size=ss, sm_scale=scale, n_rows=0),
                            warmup=1, iters=iters)
            for tau in taus:
                def fn():
                    return s2o_triton.s2o_paged(q, k, v, qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=tau,
                                                block_size=bs, segment_size=ss, q_tile=qt, sm_scale=scale,
                                                num_warps=nw, num_stages=ns, kv_contiguous=True)
                t = time_ms(fn, warmup=2, iters=iters)
                out, _, comp, caus = fn()
                r = {"bench": "s2o_speed", "L": L, "method": "s2o", "knob": tau, "block_size": bs, "segment_size": ss,
                     "q_tile": qt, "num_warps": nw, "num_stages": ns, "ms": t, "index_ms": t_idx,
                     "density": (comp.sum() / caus.sum()).item(), "ref": ref_kind, **errors(out, ref)}
                rows.append(r)
                log(r)
        for method in ("pbs", "topcdf"):
            sel = baselines.select_pbs if method == "pbs" else baselines.select_topcdf
            for g in gammas:
                t_idx = time_ms(lambda: sel(q, k, gamma=g, block_size=64, segment_size=512, sm_scale=scale),
                                warmup=1, iters=min(iters, 5))
                rank, rank_len = sel(q, k, gamma=g, block_size=64, segment_size=512, sm_scale=scale)

                def fn():
                    return s2o_triton.s2o_paged(q, k, v, qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=0.0,
                                                block_size=64, segment_size=512, q_tile=128, sm_scale=scale,
                                                rank=rank, rank_len=rank_len, kv_contiguous=True)
                t = time_ms(fn, warmup=2, iters=iters)
                out, _, comp, caus = fn()
                r = {"bench": "s2o_speed", "L": L, "method": method, "knob": g, "block_size": 64,
                     "segment_size": 512, "ms": t + t_idx, "kernel_ms": t, "index_ms": t_idx,
                     "density": (comp.sum() / caus.sum()).item(), "ref": ref_kind, **errors(out, ref)}
                rows.append(r)
                log(r)
                del rank, rank_len
        del q, k, v, ref
        torch.cuda.empty_cache()


def profile_index(L, rows, log):
    """Where the index-building time goes (CUDA-synchronised wall time per stage, median of 5)."""
    from sgl_slim.attention.s2o_ref import NUM_BUCKETS, estimate_scores, rank_from_scores
    q, k, v = make_qkv(L, HQ, HKV, D, seed=1, dtype=torch.bfloat16, device="cuda")
    scale = 1.0 / math.sqrt(D)
    for ss in (512, 2048):
        n_seg = L // ss
        seg_starts = torch.arange(n_seg, device="cuda") * ss
        e = estimate_scores(q, k, segment_size=ss, sm_scale=scale)
        keys = torch.randint(0, NUM_BUCKETS * n_seg * HKV, (n_seg * HKV * L,), device="cuda", dtype=torch.int32)
        stages = {
            "estimate_scores": lambda: estimate_scores(q, k, segment_size=ss, sm_scale=scale),
            "rank_from_scores": lambda: rank_from_scores(e, seg_starts),
            "flat_sort_only": lambda: torch.sort(keys, stable=True),
        }
        for name, fn in stages.items():
            t = time_ms(fn, warmup=1, iters=5)
            r = {"bench": "s2o_index_profile", "L": L, "segment_size": ss, "stage": name, "ms": t}
            rows.append(r)
            log(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quality", default="")
    ap.add_argument("--speed", default="")
    ap.add_argument("--taus", default="0,1e-3,3e-3,1e-2,3e-2")
    ap.add_argument("--gammas", default="0.9,0.95,0.99")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--configs", default="", help="block/segment pairs for --speed, e.g. 128/2048,64/2048")
    ap.add_argument("--profile", type=int, default=0, help="profile index building at this length")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = env_info()
    t0 = time.time()

    def log(r):
        print(f"[{time.time() - t0:6.1f}s] " + json.dumps(r), flush=True)

    for name, fn in [("s2o_index_profile", lambda rows: profile_index(args.profile, rows, log) if args.profile else None),
                     ("s2o_quality", lambda rows: quality([int(x) for x in args.quality.split(",") if x], rows, log)),
                     ("s2o_speed", lambda rows: speed([int(x) for x in args.speed.split(",") if x], rows, log,
                                                      [float(x) for x in args.taus.split(",")],
                                                      [float(x) for x in args.gammas.split(",")], args.tune,
                                                      [(int(c.split("/")[0]), int(c.split("/")[1]), 128, None, None)
                                                       for c in args.configs.split(",") if c]))]:
        rows = []
        try:
            fn(rows)
        except Exception:  # noqa: BLE001 (keep what was measured; the traceback is printed and recorded)
            traceback.print_exc()
            rows.append({"bench": name, "error": traceback.format_exc()})
        if rows:
            write_results(out / f"{name}.jsonl", rows, env=env)


if __name__ == "__main__":
    main()
