"""IDPruner selection speed (and agreement with the reference) for N in {1024, 4096, 16384}, D = 3584, keep 25%.

    python -m benchmarks.idpruner_speed --device cpu  --out benchmarks/results/idpruner_speed_cpu.jsonl
    python -m benchmarks.idpruner_speed --device cuda --out benchmarks/results/idpruner_speed_h200.jsonl

GPU rows split the time into the Gram GEMM and the single-program greedy kernel, time the torch path (one
launch per op per pick, no host sync) beside it, and sweep the kernel's launch shape at N = 4096.
``--before-module M`` (e.g. a copy of the previous ``sgl_slim/vision/idpruner.py`` saved as
``sgl_slim/vision/_idpruner_before.py``) times that module's idpruner_order / idpruner_select in the same
run ("before"), alternating with the current code, and compares the pick orders exactly.
Agreement: the pick order is compared with the plain-loop fp32 reference (N = 1024) or the fp32 torch path
on the CPU (larger N); a difference counts as a tie only if the two candidates' scores are within 1e-5.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from benchmarks.harness import env_info, markdown_table, record, time_ms, write_results
from sgl_slim.vision.idpruner import (
    cosine_gram,
    idpruner_order,
    idpruner_order_ref,
    idpruner_select,
    normalize_importance,
)
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
    ap.add_argument("--before-module", default=None, help="module with the previous idpruner_order/select")
    ap.add_argument("--iters", type=int, default=20)
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
        iters = args.iters if dev.type == "cuda" else (5 if n <= 4096 else 2)
        warm = 3 if dev.type == "cuda" else 1
        row = {"device": args.device, "n": n, "dim": args.dim, "keep": keep, "dtype": str(dtype).split(".")[1],
               "lambda": args.lam}
        sel_fn = lambda: idpruner_select(feats, imp, keep, mmr_lambda=args.lam)            # noqa: E731
        server_fn = lambda: idpruner_select(feats, imp, keep, mmr_lambda=args.lam).cpu()   # noqa: E731 (hook)
        before = importlib.import_module(args.before_module) if args.before_module else None
        for rnd in range(2 if before is not None else 1):    # alternate before / after: drift hits both
            sfx = "" if rnd == 0 else "_r2"
            if before is not None:
                row["before_select_ms" + sfx] = time_ms(lambda: before.idpruner_select(
                    feats, imp, keep, mmr_lambda=args.lam), warmup=warm, iters=iters)
                row["before_select_cpu_ms" + sfx] = time_ms(lambda: before.idpruner_select(
                    feats, imp, keep, mmr_lambda=args.lam).cpu(), warmup=warm, iters=iters)
            row["total_ms" + sfx] = time_ms(lambda: idpruner_order(feats, imp, keep, mmr_lambda=args.lam),
                                            warmup=warm, iters=iters)
            row["select_ms" + sfx] = time_ms(sel_fn, warmup=warm, iters=iters)
            row["select_cpu_ms" + sfx] = time_ms(server_fn, warmup=warm, iters=iters)
        got = idpruner_order(feats, imp, keep, mmr_lambda=args.lam).cpu().tolist()
        if before is not None:
            old = before.idpruner_order(feats, imp, keep, mmr_lambda=args.lam).cpu().tolist()
            row["same_order_as_before"] = got == old
            row["same_select_as_before"] = torch.equal(
                idpruner_select(feats, imp, keep, mmr_lambda=args.lam).cpu(),
                before.idpruner_select(feats, imp, keep, mmr_lambda=args.lam).cpu())
            if got != old:
                mm = first_mismatch(feats_cpu, imp_n, got, old, args.lam)
                row["vs_before"] = f"first difference at step {mm[0]}, gap {mm[1]:.2e}"
            imp_none_new = idpruner_order(feats, None, keep, mmr_lambda=args.lam).cpu().tolist()
            imp_none_old = before.idpruner_order(feats, None, keep, mmr_lambda=args.lam).cpu().tolist()
            row["same_order_as_before_default_importance"] = imp_none_new == imp_none_old
            row["before_select_default_importance_ms"] = time_ms(lambda: before.idpruner_select(
                feats, None, keep, mmr_lambda=args.lam), warmup=warm, iters=iters)
            row["select_default_importance_ms"] = time_ms(lambda: idpruner_select(
                feats, None, keep, mmr_lambda=args.lam), warmup=warm, iters=iters)
        if dev.type == "cuda":
            from sgl_slim.vision import idpruner_triton as it  # noqa: PLC0415
            from sgl_slim.vision.idpruner_triton import mmr_order_triton  # noqa: PLC0415
            gram = cosine_gram(feats)
            row["old_gram_ms"] = time_ms(lambda: cosine_gram(feats), warmup=warm, iters=iters)
            row["old_kernel_ms"] = time_ms(lambda: mmr_order_triton(gram, imp_n, keep, args.lam), warmup=warm,
                                           iters=iters)
            del gram
            if n <= it.FUSED_MAX_TOKENS:
                raw = it.raw_gram(feats)
                norm, bad = it.row_stats(feats)
                o, s_, st = (torch.empty(keep, dtype=torch.int64, device=dev),
                             torch.empty(keep, dtype=torch.int64, device=dev),
                             torch.empty(1, dtype=torch.int32, device=dev))
                imp32 = imp.float().contiguous()
                row["gram_ms"] = time_ms(lambda: it.raw_gram(feats), warmup=warm, iters=iters)
                row["row_stats_ms"] = time_ms(lambda: it.row_stats(feats), warmup=warm, iters=iters)
                row["kernel_ms"] = time_ms(lambda: it.launch_fused_kernel(raw, norm, bad, imp32, o, s_, st,
                                                                          args.lam, 1e-12),
                                           warmup=warm, iters=iters)
                row["device_work_ms"] = time_ms(lambda: it.mmr_select_fused(feats, imp, keep, args.lam),
                                                warmup=warm, iters=iters)
                del raw
            row["torch_path_ms"] = time_ms(lambda: idpruner_order(feats, imp, keep, mmr_lambda=args.lam,
                                                                  backend="torch"), warmup=1, iters=3)
            row["mm_out_dtype"] = _has_mm_out_dtype(feats)
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
            from sgl_slim.vision import idpruner_triton as it  # noqa: PLC0415
            saved = dict(it.FUSED_LAUNCH)
            for packed in (True, False):
                for warps in (4, 8, 16, 32):
                    it.FUSED_LAUNCH.update(num_warps=warps, packed=packed)
                    try:
                        ok = idpruner_order(feats, imp, keep, mmr_lambda=args.lam).cpu().tolist() == got
                        ms = time_ms(sel_fn, warmup=2, iters=iters)
                        rows.append(record("idpruner_fused_sweep", n=n, keep=keep, packed_argmax=packed,
                                           num_warps=warps, select_ms=ms, same_order=ok))
                    except Exception as e:  # noqa: BLE001 (a sweep point may not compile: record it)
                        rows.append(record("idpruner_fused_sweep", n=n, packed_argmax=packed, num_warps=warps,
                                           error=f"{type(e).__name__}: {e}"[:200]))
                    print(rows[-1], flush=True)
            it.FUSED_LAUNCH.clear()
            it.FUSED_LAUNCH.update(saved)
    write_results(args.out, rows, env=env_info())
    main_rows = [r for r in rows if r["bench"] == "idpruner_speed"]
    cols = ["device", "n", "dim", "keep", "dtype", "before_select_ms", "select_ms", "before_select_cpu_ms",
            "select_cpu_ms", "gram_ms", "row_stats_ms", "kernel_ms", "device_work_ms", "old_gram_ms",
            "old_kernel_ms", "torch_path_ms", "match", "same_select_as_before"]
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
