"""Would per-tile slash (relative-offset) keys fix v3's planned budget?  A quality study (CPU, fp32; no kernel).

    python -m benchmarks.s2o_slash_study --length 16384 --inputs planted,mixed --out benchmarks/results

v3 plans one budget per (segment, KV head) from 32 sampled rows, so a key that matters to a row only through its
POSITION relative to the row (a slash line i - j = delta, a local band's far field) is kept only where a sampled
row happens to read it.  MInference estimates slash lines from a few queries and adds them per query block.  Here:
per (segment, KV head), the sampled rows' mass on the earlier keys is binned by offset i - j (bins of ``--bin``
tokens, mean over the rows and the group's q heads); every bin holding at least ``theta`` of that mean mass is a
slash band, and every query tile of the segment also keeps the keys at those offsets from its rows (a contiguous
range per band: what a kernel could attend without a gather).  Compared, at each tau: v3's keys alone, and v3's
keys plus the bands at theta = 3 tau, tau, tau / 3.  Keys are the union (a key kept twice counts once); intra-
segment keys are always kept, v3's budget is rounded to whole 128-key blocks as the kernel visits it.
Reported: density = kept / causal keys over ``--rows`` random rows (all q heads), rel-L2 against exact fp32.
8 q / 2 KV heads (two Llama-3 KV groups), d 128, segment 2048.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from benchmarks.harness import write_results
from sgl_slim.attention.inputs import make_qkv
from sgl_slim.attention.inputs_mixed import make_qkv_mixed
from sgl_slim.attention.s2o_ref import planned_budget, rank_by_mass, sampled_mass, sampled_rows

HQ, HKV, D, SEGMENT, BLOCK, WINDOW, SAMPLES = 8, 2, 128, 2048, 128, 1024, 32
TAUS = [3e-2, 1e-2, 3e-3]


def offset_mass(q, k, scale: float, bin_size: int) -> torch.Tensor:
    """[n_seg, Hkv, L // bin] mean mass of the segment's sampled rows (and the group's q heads) on the earlier keys,
    by offset bin (i - j) // bin_size."""
    L = k.shape[0]
    G = HQ // HKV
    n_seg = L // SEGMENT
    hist = torch.zeros(n_seg, HKV, L // bin_size)
    for s in range(1, n_seg):
        st = s * SEGMENT
        pos = sampled_rows(torch.tensor([st]), torch.tensor([st + SEGMENT]), SAMPLES)[0]
        rows = pos.repeat_interleave(G)                                        # (row, q head of the group) pairs
        for hk in range(HKV):
            logit = (q[pos, hk * G:(hk + 1) * G].reshape(-1, D) @ k[:, hk].T) * scale
            p = torch.softmax(logit.masked_fill(torch.arange(L)[None] > rows[:, None], -math.inf), -1)[:, :st]
            off = (rows[:, None] - torch.arange(st)[None]) // bin_size
            hist[s, hk] = torch.zeros(L // bin_size).index_add_(0, off.reshape(-1), p.reshape(-1)) / len(rows)
    return hist


def study(kind: str, L: int, n_rows: int, bin_size: int, log) -> None:
    make = make_qkv if kind == "planted" else make_qkv_mixed
    q, k, v = (x.float() for x in make(L, HQ, HKV, D, seed=1, dtype=torch.bfloat16))
    G = HQ // HKV
    scale = D ** -0.5
    n_seg = L // SEGMENT
    seg_starts = torch.arange(n_seg) * SEGMENT
    rows = torch.sort(SEGMENT + torch.randperm(L - SEGMENT, generator=torch.Generator().manual_seed(0))[:n_rows]).values
    kh, vh = k.repeat_interleave(G, 1).transpose(0, 1), v.repeat_interleave(G, 1).transpose(0, 1)
    logits = (q[rows].transpose(0, 1) @ kh.transpose(1, 2)) * scale                 # [Hq, R, L]
    causal = torch.arange(L)[None, None, :] <= rows[None, :, None]
    exact = torch.softmax(logits.masked_fill(~causal, -math.inf), -1) @ vh
    e = sampled_mass(q, k, segment_size=SEGMENT, sm_scale=scale, n_sample=SAMPLES)
    rank = rank_by_mass(e, seg_starts, WINDOW)
    hist = offset_mass(q, k, scale, bin_size)
    for tau in TAUS:
        n = planned_budget(e, rank, seg_starts, torch.full((HKV,), tau), BLOCK, WINDOW)
        for theta in (None, 3 * tau, tau, tau / 3):
            keep = torch.zeros_like(causal.expand(HQ, -1, -1))
            for ri, r in enumerate(rows.tolist()):
                s, t0 = r // SEGMENT, r // BLOCK * BLOCK
                st = s * SEGMENT
                for h in range(HQ):
                    hk = h // G
                    keep[h, ri, st:r + 1] = True
                    keep[h, ri, rank[s, hk, :n[s, hk]].long()] = True
                    if theta is None:
                        continue
                    for b in torch.nonzero(hist[s, hk] >= theta).flatten().tolist():
                        lo, hi = max(0, t0 - (b + 1) * bin_size + 1), min(st, t0 + BLOCK - b * bin_size)
                        keep[h, ri, lo:max(lo, hi)] = True
            out = torch.softmax(logits.masked_fill(~keep, -math.inf), -1) @ vh
            log({"bench": "s2o_slash_study", "inputs": kind, "L": L, "rows": n_rows, "bin": bin_size, "tau": tau,
                 "method": "v3" if theta is None else "v3+slash", "theta": theta,
                 "density": (keep.sum() / causal.expand_as(keep).sum()).item(),
                 "rel_l2": ((out - exact).norm() / exact.norm()).item()})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--inputs", default="planted,mixed")
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--bin", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = []

    def log(r):
        print({k: (round(x, 5) if isinstance(x, float) else x) for k, x in r.items()}, flush=True)
        out.append(r)

    for kind in args.inputs.split(","):
        study(kind, args.length, args.rows, args.bin, log)
    print(write_results(Path(args.out) / "s2o_slash_study.jsonl", out))


if __name__ == "__main__":
    main()
