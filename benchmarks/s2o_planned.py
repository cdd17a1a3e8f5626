"""S2O v3 (the planned budget) on the GPU: what its index costs and how its ranked pass should read K/V, in ONE
run, beside cuDNN SDPA and the S2O dense path.

    python -m benchmarks.s2o_planned --lengths 32768,131072 --inputs planted,mixed --out benchmarks/results

For each input, length, number of sampled rows per segment and tau: the index alone (sampled-row softmax,
ranking, budget: ``build_index``), then the whole call (index included).  (Its first run, on 2026-12-03, also
read the ranked pass two other ways: slots loaded two blocks ahead, 20-22% slower at 128K, and the selected
keys sorted by position, 1-3% slower; both were removed, their rows stay in results/s2o_planned.jsonl.)
Error: rel-L2 over ``--rows`` sampled query rows against exact fp32
attention of those rows (``s2o_frontier.exact_rows``).  Inputs and shape as in ``s2o_frontier``.
"""

from __future__ import annotations

import math

import torch

from benchmarks.harness import time_ms
from benchmarks.s2o_frontier import (BLOCK, D, SEGMENT, exact_rows, make_inputs, rel_l2, sdpa, sweep,
                                     sweep_parser)
from sgl_slim.attention import s2o_triton

TAUS = [1e-2, 1e-3, 3e-4]
SAMPLES = [32, 128]


def run_length(kind: str, L: int, args, rows_out: list, log) -> None:
    from torch.nn.attention import SDPBackend  # noqa: PLC0415
    q, k, v = make_inputs(kind, L, "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.randperm(L, generator=gen)[:args.rows].sort().values.to("cuda")
    ref = exact_rows(q, k, v, rows)
    iters = 10 if L <= 32768 else 4
    scale = 1.0 / math.sqrt(D)
    ind = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    idx = torch.arange(L, dtype=torch.int32, device="cuda")
    base = {"bench": "s2o_planned", "inputs": kind, "L": L, "rows": args.rows}

    def emit(**r):
        r = {**base, **r}
        rows_out.append(r)
        log(r)

    t = time_ms(lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION), warmup=2, iters=iters)
    emit(method="cudnn", ms=t)

    def kernel(tau, **kw):
        return s2o_triton.s2o_paged(q, k, v, qo_indptr=ind, kv_indptr=ind, kv_indices=idx, tau=tau,
                                    block_size=BLOCK, segment_size=SEGMENT, q_tile=128, sm_scale=scale,
                                    kv_contiguous=True, **kw)

    emit(method="s2o_dense", ms=time_ms(lambda: kernel(0.0), warmup=2, iters=iters))
    for n in SAMPLES:
        for tau in TAUS:
            taus = torch.full((k.shape[1],), tau, device="cuda")
            t_idx = time_ms(lambda: s2o_triton.build_index(
                q, k, qo_indptr=[0, L], kv_indptr=[0, L], kv_indices=idx, segment_size=SEGMENT, sm_scale=scale,
                n_rows=0, block_size=BLOCK, local_window=args.local_window, planned_tau=taus, samples=n),
                warmup=1, iters=iters)
            kw = dict(stop="planned", samples=n, local_window=args.local_window)
            t = time_ms(lambda: kernel(tau, **kw), warmup=1, iters=iters)
            out, _, comp, caus = kernel(tau, **kw)
            emit(method="s2o_v3", samples=n, knob=tau, ms=t, index_ms=t_idx, density=(comp.sum() / caus.sum()).item(),
                 rel_l2=rel_l2(out[rows], ref))
    del q, k, v
    torch.cuda.empty_cache()


def main():
    ap = sweep_parser()
    ap.add_argument("--local-window", type=int, default=1024)
    sweep(ap.parse_args(), run_length, "s2o_planned")


if __name__ == "__main__":
    main()
