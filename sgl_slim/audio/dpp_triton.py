"""Samp's greedy DPP selection (``samp.dpp_select``) as ONE single-program Triton kernel: no host round trip per
pick.

The host loop reads every pick back (``argmax``, then the gain test) before it can start the next one: on an
H200 that costs 73 ms for 750 candidates -> 450 picks, and 27 ms on the host (benchmarks/samp.md).  Here one
program holds the candidates' conditional gains in registers and runs every pick: argmax (ties to the lower
index, as torch's), the incremental Cholesky row e = (L[j] - sum_s cis[s, j] cis[s]) / sqrt(gain[j]) with the
earlier rows read from a global scratch that stays in L2, and gain -= e^2.  Same fp64 arithmetic as the host
loop; only the order of the sum over earlier picks may differ (floating-point ties aside, the same picks).
A pick whose gain is at or below the degeneracy floor ends the selection (its index and the later ones are not
returned: the caller fills them by largest diagonal, as ``dpp_select`` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CANDIDATES = 4096    # the gains of one row live in one program's registers (fp64)


@triton.jit
def _dpp_greedy_kernel(k_ptr, cis_ptr, out_ptr, n_ptr, C, keep, floor, stride_k, BLOCK_C: tl.constexpr,
                       ROWS: tl.constexpr):
    offs = tl.arange(0, BLOCK_C)
    valid = offs < C
    gain = tl.load(k_ptr + offs * (stride_k + 1), mask=valid, other=0.0).to(tl.float64)   # the diagonal
    taken = offs >= C                                                 # padding counts as taken
    alive = tl.full((), 1, tl.int32)
    n_alive = tl.full((), 0, tl.int32)
    for t in range(keep):
        g = tl.where(taken, float("-inf"), gain)
        g_max, j = tl.max(g, axis=0, return_indices=True, return_indices_tie_break_left=True)
        alive = alive & (g_max > floor).to(tl.int32)
        row = tl.load(k_ptr + j.to(tl.int64) * stride_k + offs, mask=valid, other=0.0).to(tl.float64)
        # sum_s cis[s, j] cis[s]: ROWS earlier rows per step (wide loads in flight instead of one row at a time)
        proj = tl.zeros([BLOCK_C], tl.float64)
        for s0 in range(0, t, ROWS):
            rows = s0 + tl.arange(0, ROWS)
            r_ok = rows < t
            c_sj = tl.load(cis_ptr + rows * BLOCK_C + j, mask=r_ok, other=0.0)
            tile = tl.load(cis_ptr + rows[:, None] * BLOCK_C + offs[None, :], mask=r_ok[:, None], other=0.0)
            proj += tl.sum(c_sj[:, None] * tile, axis=0)
        e = (row - proj) / tl.sqrt(tl.maximum(g_max, floor))
        tl.store(cis_ptr + t * BLOCK_C + offs, e)
        tl.debug_barrier()                                            # the row is read by every later pick
        gain = gain - e * e
        taken = taken | (offs == j)
        tl.store(out_ptr + t, j, mask=alive == 1)
        n_alive += alive
    tl.store(n_ptr, n_alive)


def dpp_picks_triton(kernel: torch.Tensor, keep: int, floor: float) -> torch.Tensor:
    """The greedy picks in pick order (int64 [<= keep]) of a PSD kernel [C, C] (fp64 arithmetic), stopping at
    the first pick whose conditional gain is <= ``floor``.  One launch and one read-back."""
    c = kernel.shape[0]
    if kernel.shape != (c, c) or not 1 <= keep <= c or c > MAX_CANDIDATES:
        raise ValueError(f"dpp_picks_triton: want a square kernel of at most {MAX_CANDIDATES} rows and "
                         f"1 <= keep <= C, got {tuple(kernel.shape)} and keep {keep}")
    k = kernel.to(torch.float64).contiguous()
    block = triton.next_power_of_2(c)
    cis = torch.empty(keep, block, dtype=torch.float64, device=k.device)
    out = torch.empty(keep, dtype=torch.int32, device=k.device)
    n = torch.zeros(1, dtype=torch.int32, device=k.device)
    _dpp_greedy_kernel[(1,)](k, cis, out, n, c, keep, float(floor), k.stride(0), BLOCK_C=block,
                             ROWS=max(1, min(16, 8192 // block)), num_warps=8)
    return out[: int(n)].long()
