"""Where should S2O's budget be planned, and from what?  A quality study (CPU, fp32; no kernel, no timing).

    python -m benchmarks.s2o_budget_study --length 32768 --inputs planted,mixed --out benchmarks/results

For ``--rows`` random query rows (seeded) of ``make_qkv`` / ``make_qkv_mixed`` (32 q / 8 KV heads, d 128), every
method keeps the row's intra-segment keys [seg_start, i] and chooses among the earlier keys [0, seg_start) with
the planned rule of S2O v3: keys ranked by an estimated mass e_j, the fewest kept whose estimated left-out mass is
<= tau.  What differs is where e is estimated, per KV head (mean over the group's 4 q heads):
  * ``segment_32``: the exact softmax of 32 strided rows of the 2048-row segment (S2O v3 as built);
  * ``tile_8``: the exact softmax of 8 strided rows of the row's 128-row query tile;
  * ``tile_all``: the exact softmax of all 128 rows of the tile (an oracle for a per-tile budget: it costs a
    dense pass);
  * ``tile_top32`` / ``tile_top16``: all 128 rows of the tile, logits from each row's 32 / 16 largest |q_d|
    coordinates only (SparQ-style; the intra-segment part exact), i.e. a per-tile estimate at 1/4 / 1/8 of the
    dot-product work;
  * ``row_oracle``: per row, the fewest earlier keys holding ``knob`` of its mass (the token oracle);
  * ``+comp`` (after ``segment_32`` and ``tile_all``): the same keys, plus tail compensation from the estimate
    (``_compensated``).
Density = kept keys / causal keys over the evaluated rows (tokens, no block rounding); rel-L2 against exact fp32
attention of those rows.  Results: JSON lines, one per (inputs, method, knob).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.harness import write_results
from benchmarks.s2o_frontier import make_inputs
from sgl_slim.attention.s2o_ref import planned_budget, sampled_rows

SEGMENT, TILE, GROUP = 2048, 128, 4
TAUS = [0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4]
ORACLE_MASS = [0.99, 0.997]
COMPENSATED = ("segment_32", "tile_all")


def _softmax(q, k, rows, h, end, scale, dims=None):
    """Exact causal softmax of the q heads of KV head h at positions ``rows`` over keys [0, end): [G*R, end].
    dims: keep only each row's ``dims`` largest |q| coordinates for the keys before ``dims_before`` (tuple)."""
    qs = q[rows, h * GROUP:(h + 1) * GROUP].transpose(0, 1).reshape(-1, q.shape[-1])
    s = qs @ k[:end, h].T * scale
    if dims is not None:
        r, before = dims
        top = qs.abs().topk(r, -1).indices
        qr = torch.zeros_like(qs).scatter_(-1, top, qs.gather(-1, top))
        s[:, :before] = qr @ k[:before, h].T * scale
    late = torch.arange(end)[None] > rows.repeat(GROUP)[:, None]
    return torch.softmax(s.masked_fill(late, -math.inf), -1)


def _compensated(pk: torch.Tensor, vv: torch.Tensor, e: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Tail compensation from the estimate: every row keeps, beside its kept keys, the estimated dropped share
    delta = sum of e over the dropped earlier keys, as one term r = l * delta / (1 - delta) (l: the row's kept
    mass) whose value is the e-weighted mean value of the dropped keys."""
    drop = e * ~kept
    delta = float(drop.sum())
    l = pk.sum(-1, keepdim=True)
    if delta <= 0:
        return (pk @ vv) / l
    vbar = (drop @ vv[:drop.shape[0]]) / delta
    r = l * delta / max(1.0 - delta, 1e-6)
    return (pk @ vv + r * vbar) / (l + r)


def _strided(lo: int, hi: int, n: int) -> torch.Tensor:
    """``n`` evenly strided rows of [lo, hi): the rows S2O v3 samples (``s2o_ref.sampled_rows``)."""
    return sampled_rows(torch.tensor([lo]), torch.tensor([hi]), n)[0]


def _planned(e: torch.Tensor, tau: float) -> torch.Tensor:
    """The keys S2O v3's rule keeps (``planned_budget`` with token blocks), in exact order of e."""
    order = torch.sort(e, descending=True).indices
    n = planned_budget(e[None, None], order[None, None], torch.tensor([e.shape[0]]), torch.tensor([tau]), 1)
    return order[:int(n)]


def study(kind: str, L: int, n_rows: int, log) -> list[dict]:
    q, k, v = (t.float() for t in make_inputs(kind, L, "cpu"))
    scale = 1 / math.sqrt(q.shape[-1])
    gen = torch.Generator().manual_seed(0)
    rows = torch.randperm(L - SEGMENT, generator=gen)[:n_rows].sort().values + SEGMENT   # rows with earlier keys
    acc: dict = {}

    def add(name, knob, kept, causal, err2, ref2):
        a = acc.setdefault((name, knob), [0, 0, 0.0, 0.0])
        a[0] += kept
        a[1] += causal
        a[2] += err2
        a[3] += ref2

    t0 = time.time()
    for tile in sorted({int(r) // TILE for r in rows}):
        t_lo = tile * TILE
        st = t_lo // SEGMENT * SEGMENT
        ev = rows[(rows >= t_lo) & (rows < t_lo + TILE)]
        all_rows = torch.arange(t_lo, t_lo + TILE)
        for h in range(k.shape[1]):
            p = _softmax(q, k, ev, h, int(ev.max()) + 1, scale)                  # the evaluated rows, exact
            vv = v[:p.shape[1], h]
            ref = p @ vv
            ref2 = float((ref ** 2).sum())
            causal = int((ev + 1).sum()) * GROUP
            intra = int((ev + 1 - st).sum()) * GROUP
            est = {
                "segment_32": _softmax(q, k, _strided(st, st + SEGMENT, 32), h, st + SEGMENT, scale),
                "tile_8": _softmax(q, k, _strided(t_lo, t_lo + TILE, 8), h, t_lo + TILE, scale),
                "tile_all": _softmax(q, k, all_rows, h, t_lo + TILE, scale),
                "tile_top32": _softmax(q, k, all_rows, h, t_lo + TILE, scale, dims=(32, st)),
                "tile_top16": _softmax(q, k, all_rows, h, t_lo + TILE, scale, dims=(16, st)),
            }
            for name, ps in est.items():
                e = ps[:, :st].mean(0)
                for tau in TAUS:
                    keep = torch.zeros(p.shape[1], dtype=torch.bool)
                    keep[_planned(e, tau)] = True
                    keep[st:] = True
                    pk = p * keep
                    o = (pk @ vv) / pk.sum(-1, keepdim=True)
                    dens = intra + int(keep[:st].sum()) * len(ev) * GROUP
                    add(name, tau, dens, causal, float(((o - ref) ** 2).sum()), ref2)
                    if name in COMPENSATED:
                        o = _compensated(pk, vv, e, keep[:st])
                        add(name + "+comp", tau, dens, causal, float(((o - ref) ** 2).sum()), ref2)
            for mass in ORACLE_MASS:
                pe = p[:, :st]
                srt, idx = torch.sort(pe, -1, descending=True)
                before = p[:, st:].sum(-1, keepdim=True) + srt.cumsum(-1) - srt
                keep = torch.zeros_like(pe, dtype=torch.bool).scatter_(-1, idx, before < mass)
                pk = torch.cat([pe * keep, p[:, st:]], -1)
                o = (pk @ vv) / pk.sum(-1, keepdim=True)
                add("row_oracle", mass, intra + int(keep.sum()), causal, float(((o - ref) ** 2).sum()), ref2)
    out = []
    for (name, knob), (kept, causal, err2, ref2) in acc.items():
        r = {"bench": "s2o_budget_study", "inputs": kind, "L": L, "rows": n_rows, "method": name, "knob": knob,
             "density": kept / causal, "rel_l2": math.sqrt(err2 / ref2)}
        out.append(r)
        log(r)
    log({"inputs": kind, "seconds": round(time.time() - t0, 1)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--inputs", default="planted,mixed")
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    for kind in args.inputs.split(","):
        rows += study(kind, args.length, args.rows, lambda r: print(json.dumps(r), flush=True))
        write_results(Path(args.out) / "s2o_budget_study.jsonl", rows)


if __name__ == "__main__":
    main()
