"""IDPruner selection speed (and agreement with the reference) for N in {1024, 4096, 16384}, D = 3584, keep 25%.

    python -m benchmarks.idpruner_speed --device cpu  --out benchmarks/results/idpruner_speed_cpu.jsonl
    python -m benchmarks.idpruner_speed --device cuda --out benchmarks/results/idpruner_speed_h200.jsonl

GPU rows split the time into the Gram GEMM and the single-program greedy kernel, time the torch path (one
launch per op per pick, no host sync) beside it, and sweep the kernel's launch shape at N = 4096.
Agreement: the pick order is compared with the plain-loop fp32 reference (N = 1024) or the fp32 torch path
on the CPU (larger N); a difference counts as a tie only if the two candidates' scores are within 1e-5.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.harness import env_info, markdown_table, record, time_ms, write_results
from sgl_slim.vision.idpruner import cosine_gram, idpruner_order, idpruner_order_ref, normalize_importance
from sgl_slim.vision.importance import compute_importance

TIE_TOL = 1e-5


def first_mismatch(features, imp_n, got, want, lam):
    """None if equal; else (step, gap) where gap is the reference-state score gap of the two candidates."""
    if got == want:
        return None
    step = next(t for t, (a, b) in enumerate(zip(got, want)) if a != b)
    unit = features.float().cpu()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    imp_n = imp_n.cpu()
    if step == 0:
        scores = imp_n
    else:
        scores = lam * imp_n - (1 - lam) * (unit @ unit[want[:step]].T).max(dim=1).values
    return step, abs(float(scores[got[step]]) - float(scores[want[step]]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="1024,4096,16384")
    ap.add_argument("--dim", type=int, default=3584)
    ap.add_argument("--keep-ratio", type=float, default=0.25)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--sweep", action="store_true", help="GPU: sweep BLOCK_N / num_warps at N = 4096")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        keep = round(n * args.keep_ratio)
        gen = torch.Generator().manual_seed(n)
        feats_cpu = torch.randn(n, args.dim, generator=gen).to(dtype)
        feats = feats_cpu.to(dev)
        imp = compute_importance(feats)                      # the default: embedding norm
        imp_n = normalize_importance(imp)
        iters = 20 if dev.type == "cuda" else (5 if n <= 4096 else 2)
        warm = 3 if dev.type == "cuda" else 1
        row = {"device": args.device, "n": n, "dim": args.dim, "keep": keep, "dtype": str(dtype).split(".")[1],
               "lambda": args.lam}
        row["total_ms"] = time_ms(lambda: idpruner_order(feats, imp, keep, mmr_lambda=args.lam),
                                  warmup=warm, iters=iters)
        got = idpruner_order(feats, imp, keep, mmr_lambda=args.lam).cpu().tolist()
        if dev.type == "cuda":
            from sgl_slim.vision.idpruner_triton import mmr_order_triton  # noqa: PLC0415
            gram = cosine_gram(feats)
            row["gram_ms"] = time_ms(lambda: cosine_gram(feats), warmup=warm, iters=iters)
            row["kernel_ms"] = time_ms(lambda: mmr_order_triton(gram, imp_n, keep, args.lam), warmup=warm,
                                       iters=iters)
            row["torch_path_ms"] = time_ms(lambda: idpruner_order(feats, imp, keep, mmr_lambda=args.lam,
                                                                  backend="torch"), warmup=1, iters=3)
            row["mm_out_dtype"] = _has_mm_out_dtype(feats)
            del gram
        # agreement
        t0 = time.perf_counter()
        if n <= 1024:
            want = idpruner_order_ref(feats_cpu, imp.cpu(), keep, mmr_lambda=args.lam)
            row["checked_against"] = "plain-loop reference"
        elif dev.type == "cuda" and n <= 4096:
            want = idpruner_order(feats_cpu.float(), imp.cpu(), keep, mmr_lambda=args.lam, backend="torch").tolist()
            row["checked_against"] = "fp32 torch path on CPU"
        elif dev.type == "cuda":
            want = idpruner_order(feats, imp, keep, mmr_lambda=args.lam, backend="torch").cpu().tolist()
            row["checked_against"] = "torch path on the same GPU"
        else:
            want = None
        if want is not None:
            mm = first_mismatch(feats_cpu, imp_n, got, want, args.lam)
            row["match"] = "exact" if mm is None else (f"tie at step {mm[0]} (gap {mm[1]:.2e})"
                                                       if mm[1] <= TIE_TOL else f"MISMATCH at step {mm[0]} gap {mm[1]:.2e}")
            row["check_s"] = round(time.perf_counter() - t0, 1)
        rows.append(record("idpruner_speed", **row))
        print(rows[-1], flush=True)
        if args.sweep and dev.type == "cuda" and n == 4096:
            from sgl_slim.vision.idpruner_triton import mmr_order_triton  # noqa: PLC0415
            gram = cosine_gram(feats)
            for block_n in (1024, 2048, 4096):
                for warps in (4, 8, 16, 32):
                    try:
                        out = mmr_order_triton(gram, imp_n, keep, args.lam, block_n=block_n, num_warps=warps)
                        ok = out.cpu().tolist() == got
                        ms = time_ms(lambda: mmr_order_triton(gram, imp_n, keep, args.lam, block_n=block_n,
                                                              num_warps=warps), warmup=2, iters=10)
                        rows.append(record("idpruner_kernel_sweep", n=n, keep=keep, block_n=block_n,
                                           num_warps=warps, kernel_ms=ms, same_order=ok))
                    except Exception as e:  # noqa: BLE001 (a sweep point may not compile: record it)
                        rows.append(record("idpruner_kernel_sweep", n=n, block_n=block_n, num_warps=warps,
                                           error=f"{type(e).__name__}: {e}"[:200]))
                    print(rows[-1], flush=True)
            del gram
    write_results(args.out, rows, env=env_info())
    main_rows = [r for r in rows if r["bench"] == "idpruner_speed"]
    cols = ["device", "n", "dim", "keep", "dtype", "total_ms", "gram_ms", "kernel_ms", "torch_path_ms", "match"]
    print(markdown_table(main_rows, [c for c in cols if any(c in r for r in main_rows)]))
    return 0


def _has_mm_out_dtype(x) -> bool:
    try:
        torch.mm(x[:2], x[:2].T, out_dtype=torch.float32)
        return True
    except TypeError:
        return False


if __name__ == "__main__":
    sys.exit(main())
