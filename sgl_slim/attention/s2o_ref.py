"""S2O sparse prefill attention: readable fp32 reference (one causal sequence, GQA, cached prefix).

S2O ("Early Stopping for Sparse Attention via Online Permutation", arXiv 2602.22575) as implemented here.
Positions are absolute: the sequence has ``L`` keys, the queries are its LAST ``Tq`` positions
(``prefix = L - Tq`` keys were cached before; chunked prefill and prefix-cache hits look like this).

Segments and tiles (both aligned to absolute positions, so a chunked prefill cuts them the same way):
  * segment  s = pos // segment_size;  seg_start = s * segment_size.  Every key before ``seg_start`` is
    visible to every query of the segment, so those "earlier keys" may be visited in any order.
  * query tile = pos // q_tile (q_tile divides segment_size).  The early stop is decided per
    (query tile, query head), exactly as the Triton kernel does it.

Per (query tile, head):
  1. Intra pass: dense causal attention to keys [seg_start, last query of the tile] (initialises the online
     softmax state m, l, acc).  These "diagonal" blocks are never skipped.
  2. Ranked pass over the earlier keys through the index array ``rank[seg, kv_head, :]`` (virtual ->
     physical position; never a copy of K/V).  With a LOCAL WINDOW W > 0 the W keys just before the segment
     come first in every rank row and their ceil(W / B) blocks are always visited (the band just before the
     segment, which a segment-pooled query cannot rank: its high-frequency RoPE components average out).
     Virtual block b = rank entries [b*B, (b+1)*B).  After adding block b, the scan stops if, for EVERY
     query row of the tile, the STOP RULE holds.  The block that triggers the stop is still included.
     tau = 0 never stops (strict <), so tau = 0 is dense attention up to summation order.

Stop rules (block_mass = sum_j exp(s_ij - m) over block b's keys, l = the row's mass so far):
  * ``"block"`` (S2O v1):      block_mass < tau * (l before the block).  The mass it drops is the whole
    tail: with n low-mass blocks left it is up to n * tau * l, so the error is set by the tail's length, not
    by tau (the cliff measured in benchmarks/s2o.md).
  * ``"remaining"`` (v2):       block_mass * R[b] < tau * l, where R[b] = the blocks left (``tail_estimate``
    "flat", the default), or (estimated mass of the blocks after b) / (estimated mass of block b) from the
    ranking's own estimate ("estimate", ``remaining_ratio``: measured far too sharp, kept for the comparison).
    So block_mass * R[b] is the unvisited mass predicted from the block just measured, and tau is the share
    of the row's mass left unvisited.
  * ``"planned"`` (v3): no test inside the scan.  Before it, each segment's KV head gets a key ORDER and a
    BUDGET from the exact softmax of ``SAMPLES`` evenly strided query rows of the segment (each q head of the
    group): e_j = mean over those rows of p_ij, normalised over the row's own causal keys (``sampled_mass``).
    Keys are ranked by e (``rank_by_mass``) and the scan visits the fewest leading blocks whose estimated
    dropped mass sum_{j not visited} e_j is at most tau (``planned_budget``).  So tau is directly the
    expected share of a row's softmax mass left out (the sampled rows' mean), the budget is set before the
    kernel runs, and the rows' own normalisation weighs a key that one part of the segment needs as much as
    the row finds it (a pooled query averages such keys away).
  * ``audit`` (with "planned": S2O v4): after the planned blocks, every remaining ranked block of the segment
    is AUDITED: its scores q.k are computed (no exponentials, no values) and the block is visited if, for any
    row of the tile, a key in it holds more than tau of the row's mass after the planned blocks
    (s_ij > m_i + ln l_i + ln tau, with m, l the state after the planned blocks: one threshold per row, so
    every block's verdict is independent of the others' and the kernel audits them in one pass without a
    branch, then visits the hits in rank order).  The planned budget covers what the sampled rows share; the
    audit finds the keys that matter to rows the sampling missed (a needle that only the question's rows
    read).  An audited block that is not visited costs its score product only; density counts the visited
    (attended) blocks.
  * ``audit_last`` R > 0 (S2O v5): the audit runs only for the query tiles that hold one of the sequence's last
    R positions; every other tile keeps the planned budget alone (v3).  The audit costs about 0.4 of an
    attended block for every block it checks (benchmarks/s2o.md), so v4 is rarely faster than dense attention;
    v5 puts it where a prompt's next token is read: the last rows (the question, the instruction) are the ones
    whose output the first generated token depends on, and they see every key holding more than tau of their
    mass.  Rows elsewhere may miss a key only they read (v3's error); a chunked prefill audits the last rows of
    every chunk.
Tail compensation (v2, ``compensate``): at the stop the predicted unvisited mass rem = block_mass * R[b]
is kept in the softmax as one term whose value is the mean value of the segment's earlier keys
(``value_means``): l += rem, acc += rem * vbar.  Then the error is the error of that prediction, not the
dropped mass itself (ALGORITHMS.md 1b: ||O - O_kept|| = dropped * ||mean_v(tail) - mean_v(kept)||).

Ranking (``rank_keys``), per (segment, KV head), at TOKEN granularity:
  * pooled query qbar_h = mean of the segment's queries (those present in this launch) of q head h;
  * estimate  e_j = max over the q heads h of the KV head's group of  sm_scale * qbar_h . k_j;
  * quantised to 256 buckets: bucket_j = clamp(floor((max_e - e_j) / w), 0, 255), w = (max_e - mean_e)/64
    (scale free: the top 64 buckets span max..mean, the rest three more such spans);
  * rank = stable sort by bucket (ties keep position order), done as ONE flat radix sort of
    (row, bucket) keys on the GPU.  The quantisation makes the order reproducible on any device and costs
    nothing measurable: keys in one bucket differ by < w in estimated logit.
  Why this estimator (H200, 8K, block 64, segment 512; benchmarks/s2o.md, "estimator ablation"): at
  tau = 1e-3 the pooled max-over-group estimate gives density 0.570 / rel-L2 0.0138; mean over the group
  0.572 / 0.0137 (the same: the generator's heads of a group share key features); logsumexp over 4
  strided real queries 0.669 / 0.0185 (worse), over 16 queries 0.607 / 0.0125 (about the same error at
  higher density, 16x the estimation cost).  Putting the 128 keys just before the segment first
  ("recency", a locality prior) was WORSE (0.582 / 0.0408): a low-mass block early in the order trips
  the early stop before the sink and stripe keys are reached; the stop needs a monotone ranking.  So:
  pooled query, max over the group, no recency (``recent`` = 0; kept as an option).
Keys at or after ``seg_start`` get bucket 255 and, being later in position, sort after every earlier
key; only the first ``seg_start`` entries of a rank row are used.

Density = computed score blocks / causal score blocks, counted on the (query tile x key block) grid:
per (tile, head) the causal blocks are ``seg_start / B + ceil((last + 1 - seg_start) / B)``, the computed
ones the same with ``seg_start / B`` replaced by the number of visited virtual blocks.

Sizes (measured, benchmarks/s2o.md): q_tile 128 (64 halves the density at equal tau but doubles the error:
no better trade-off, and the kernel is slower per block).  block_size 128 is at least as good as 64 at
equal density (32K: rel-L2 0.0104 at density 0.83 vs 64's 0.0063 at 0.91 / 0.031 at 0.69) and its
kernel is faster (128K dense: 342 vs 372 ms); 32 is clearly worse.  segment_size 512, 1024, 2048 give
the same quality curve within noise, and 2048 cuts the index building 3.5x at 128K (8.5 vs 29 ms).
Block 128 / segment 2048 are the defaults of the API and of the serving flags alike.
"""

from __future__ import annotations

import math

import torch

NUM_BUCKETS = 256
BUCKETS_PER_SPAN = 64  # buckets between the max and the mean of the estimate
RECENT = 0            # keys just before the segment ranked first; 0: measured best (benchmarks/s2o.md)
STOP_RULES = ("block", "remaining", "planned")
SAMPLES = 32          # query rows per segment whose exact softmax plans the "planned" budget (x the group's heads)
MASS_REDUCES = ("mean", "max")   # "planned": a key's estimate over the sampled rows
MASS_MANTISSA_BITS = 3   # "planned" ranking: buckets of ~2^(1/8) in estimated mass (exponent + 3 mantissa bits)
FP8_KV = (torch.float8_e4m3fn, torch.float8_e5m2)   # K/V cache dtypes read with a scale (q in bf16 / fp16)
TAIL_ESTIMATES = ("flat", "estimate")
AUDIT_LAST = 128      # v5: the audit covers the tiles holding the sequence's last AUDIT_LAST positions
# named settings of (stop rule, local window, tail compensation, ...); "v4" is the default of the public API
VARIANTS = {
    "v1": {"stop": "block", "local_window": 0, "compensate": False, "tail_estimate": "flat"},
    "v2": {"stop": "remaining", "local_window": 1024, "compensate": True, "tail_estimate": "flat"},
    "v3": {"stop": "planned", "local_window": 1024, "compensate": False, "tail_estimate": "flat",
           "samples": SAMPLES, "mass_reduce": "mean"},
    "v4": {"stop": "planned", "local_window": 1024, "compensate": False, "tail_estimate": "flat",
           "samples": SAMPLES, "mass_reduce": "mean", "audit": True},
    "v5": {"stop": "planned", "local_window": 1024, "compensate": False, "tail_estimate": "flat",
           "samples": SAMPLES, "mass_reduce": "mean", "audit": True, "audit_last": AUDIT_LAST},
}


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, segment_size: int,
           q_tile: int) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [Tq, Hq, D], k and v [L, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) and head "
                         f"dims must match ({q.shape[2]} vs {k.shape[2]})")
    if q.shape[0] > k.shape[0]:
        raise ValueError(f"more queries ({q.shape[0]}) than keys ({k.shape[0]})")
    if segment_size % block_size or segment_size % q_tile:
        raise ValueError(f"segment_size ({segment_size}) must be a multiple of block_size ({block_size}) "
                         f"and of q_tile ({q_tile})")


def segment_range(L: int, Tq: int, segment_size: int) -> range:
    """Segment ids that hold at least one query of the launch."""
    prefix = L - Tq
    return range(prefix // segment_size, (L - 1) // segment_size + 1) if Tq > 0 else range(0)


def token_scores(q: torch.Tensor, k: torch.Tensor, *, segment_size: int, sm_scale: float,
                 n_sample: int = 0) -> torch.Tensor:
    """Per-QUERY-head estimate t[s, h, j] of key j's logit for segment s, [n_seg, Hq, L] in q's dtype
    (fp32 on CPU).  n_sample = 0: pooled query, t = sm_scale * qbar_{s,h} . k_j with qbar the mean of the
    segment's queries present in the launch.  n_sample > 0: logsumexp over n_sample evenly strided
    queries of the segment (closer to the true attention mass, n_sample x the cost).
    q: [Tq, Hq, D] (the last Tq positions), k: [L, Hkv, D]."""
    Tq, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    prefix = L - Tq
    segs = segment_range(L, Tq, segment_size)
    n_seg = len(segs)
    lo = torch.tensor([max(prefix, s * segment_size) - prefix for s in segs]).to(q.device, non_blocking=True)
    hi = torch.tensor([min(L, (s + 1) * segment_size) - prefix for s in segs]).to(q.device, non_blocking=True)
    if n_sample == 0:
        # segment sums on the padded segment grid (one read of q, fp32 accumulation)
        off = prefix - segs.start * segment_size
        q_pad = q.new_zeros(n_seg * segment_size, Hq, D)
        q_pad[off:off + Tq] = q
        qsum = q_pad.view(n_seg, segment_size, Hq, D).sum(1, dtype=torch.float32)
        qs = (qsum / (hi - lo).float()[:, None, None]).to(q.dtype)[:, None]                  # [n_seg, 1, Hq, D]
    else:
        qs = q[sampled_rows(lo, hi, n_sample)]                                               # [n_seg, R, Hq, D]
    R = qs.shape[1]
    qs = qs.view(n_seg, R, Hkv, G, D).permute(2, 0, 3, 1, 4).reshape(Hkv, n_seg * G * R, D)
    t = torch.matmul(qs * sm_scale, k.permute(1, 2, 0)).view(Hkv, n_seg, G, R, L)           # [Hkv, n_seg, G, R, L]
    t = t[:, :, :, 0] if R == 1 else torch.logsumexp(t.float(), 3).to(t.dtype)
    return t.permute(1, 0, 2, 3).reshape(n_seg, Hq, L)


def estimate_scores(q: torch.Tensor, k: torch.Tensor, *, segment_size: int, sm_scale: float,
                    group_reduce: str = "max", n_sample: int = 0) -> torch.Tensor:
    """Importance estimate e[s, h_kv, j] of key j for segment s: ``token_scores`` reduced over the q heads
    of each KV group (max, or mean).  fp32, [n_seg, Hkv, L]."""
    t = token_scores(q, k, segment_size=segment_size, sm_scale=sm_scale, n_sample=n_sample)
    n_seg, Hq, L = t.shape
    t = t.view(n_seg, k.shape[1], Hq // k.shape[1], L)
    return (t.amax(2) if group_reduce == "max" else t.mean(2)).float()


def rank_from_scores(e: torch.Tensor, seg_starts: torch.Tensor, recent: int = RECENT) -> torch.Tensor:
    """Stable sort of the earlier keys by quantised estimate.  e: [n_seg, Hkv, L] fp32,
    seg_starts: [n_seg] int64; the ``recent`` keys just before seg_start go first (bucket 0).
    Returns rank [n_seg, Hkv, L] int32 (virtual -> physical position)."""
    n_seg, Hkv, L = e.shape
    pos = torch.arange(L, device=e.device)[None, None, :]
    valid = pos < seg_starts[:, None, None]
    cnt = seg_starts.clamp(min=1).to(e.dtype)[:, None]
    e_max = e.masked_fill(~valid, -math.inf).amax(-1)               # [n_seg, Hkv]
    e_mean = e.masked_fill(~valid, 0.0).sum(-1) / cnt
    width = ((e_max - e_mean) / BUCKETS_PER_SPAN).clamp(min=1e-6)
    bucket = ((e_max[..., None] - e) / width[..., None]).floor().clamp(0, NUM_BUCKETS - 1)
    return _sort_buckets(bucket, seg_starts, recent)


def _sort_buckets(bucket: torch.Tensor, seg_starts: torch.Tensor, first: int) -> torch.Tensor:
    """Rank rows from buckets [n_seg, Hkv, L] (float, values in [0, NUM_BUCKETS - 1]): the ``first`` keys
    just before seg_start get bucket 0, keys at or after it the last bucket; then a stable sort of every row
    -> positions, int32.  One flat stable sort of (row, bucket) keys == a stable sort of every row (one radix
    sort on the GPU instead of one per row)."""
    n_seg, Hkv, L = bucket.shape
    pos = torch.arange(L, device=bucket.device)[None, None, :]
    valid = pos < seg_starts[:, None, None]
    bucket = bucket.masked_fill(valid & (pos >= seg_starts[:, None, None] - first), 0)
    bucket = bucket.masked_fill(~valid, NUM_BUCKETS - 1).to(torch.int32)
    rows = torch.arange(n_seg * Hkv, device=bucket.device, dtype=torch.int32).view(n_seg, Hkv, 1)
    order = torch.sort((bucket + rows * NUM_BUCKETS).flatten(), stable=True).indices
    return (order.view(n_seg, Hkv, L) % L).to(torch.int32)


def sampled_rows(lo: torch.Tensor, hi: torch.Tensor, n_sample: int) -> torch.Tensor:
    """n_sample evenly strided rows of [lo, hi) per segment (row lo + floor((i + 1/2) (hi - lo) / n_sample), in
    integer arithmetic so that every device and the kernels pick the same rows): [n_seg, n_sample] int64 (rows
    repeat when a segment holds fewer)."""
    odd = 2 * torch.arange(n_sample, device=lo.device, dtype=torch.int64) + 1
    return lo[:, None] + torch.div(odd[None, :] * (hi - lo)[:, None], 2 * n_sample, rounding_mode="floor")


def sampled_mass(q: torch.Tensor, k: torch.Tensor, *, segment_size: int, sm_scale: float,
                 n_sample: int = SAMPLES, reduce: str = "mean") -> torch.Tensor:
    """e[s, h_kv, j] = mean (``reduce`` "mean") or max ("max") over the ``n_sample`` strided query rows of
    segment s (those present in the launch) and the q heads of KV head h_kv of the row's exact causal softmax
    p_ij, for the earlier keys j < seg_start (0 elsewhere).  fp32 [n_seg, Hkv, L].  q: [Tq, Hq, D] (the last
    Tq positions), k: [L, Hkv, D].  With "mean", sum_j e[s, h, j] is the share of the sampled rows' mass on
    earlier keys; with "max", the sum over any set of keys bounds every sampled row's mass on them."""
    if reduce not in MASS_REDUCES:
        raise ValueError(f"mass_reduce must be one of {MASS_REDUCES}, got {reduce!r}")
    Tq, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    prefix = L - Tq
    segs = segment_range(L, Tq, segment_size)
    e = torch.zeros(len(segs), Hkv, L, dtype=torch.float32, device=q.device)
    for si, s in enumerate(segs):
        st = s * segment_size
        if st == 0:
            continue
        lo, hi = max(prefix, st), min(L, st + segment_size)
        pos = sampled_rows(torch.tensor([lo]), torch.tensor([hi]), n_sample)[0].to(q.device)      # [R]
        end = int(pos.max()) + 1
        qs = q[pos - prefix].float().view(n_sample, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * n_sample, D)
        logit = torch.matmul(qs, k[:end].float().permute(1, 2, 0)) * sm_scale                 # [Hkv, G*R, end]
        late = torch.arange(end, device=q.device)[None, None, :] > pos.repeat(G)[None, :, None]
        p = torch.softmax(logit.masked_fill(late, -math.inf), -1)
        e[si, :, :st] = p[..., :st].mean(1) if reduce == "mean" else p[..., :st].amax(1)
    return e


def mass_octaves(e: torch.Tensor) -> torch.Tensor:
    """About 8 log2(e) of e >= 0 (fp32) as an integer: the float's exponent and its top MASS_MANTISSA_BITS mantissa
    bits (bits >> 20), steps of 2^0.09 to 2^0.17 in mass.  Integer arithmetic on the bits, so the reference,
    the kernels and every device put a key in the same bucket."""
    return e.contiguous().view(torch.int32) >> (23 - MASS_MANTISSA_BITS)


def rank_by_mass(e: torch.Tensor, seg_starts: torch.Tensor, local_window: int = 0) -> torch.Tensor:
    """Keys by estimated mass, largest first: stable sort by bucket = mass_octaves(e_max) - mass_octaves(e_j)
    (0..254; 254 also for e_j = 0: 32 octaves below the max), the ``local_window`` keys before seg_start first.
    The quantisation makes the order the same on any device.  e [n_seg, Hkv, L] -> rank int32."""
    L = e.shape[-1]
    pos = torch.arange(L, device=e.device)[None, None, :]
    valid = pos < seg_starts[:, None, None]
    octaves = mass_octaves(e.float().masked_fill(~valid, 0.0))
    bucket = (octaves.amax(-1, keepdim=True) - octaves).clamp(0, NUM_BUCKETS - 2)
    return _sort_buckets(bucket, seg_starts, local_window)


def planned_budget(e: torch.Tensor, rank: torch.Tensor, seg_starts: torch.Tensor, tau_kv: torch.Tensor,
                   block_size: int, local_window: int = 0) -> torch.Tensor:
    """Rank entries to visit [n_seg, Hkv] int32: the fewest leading entries of ``rank`` whose estimated dropped
    mass (sum of e over the entries left out) is at most tau (tau_kv [Hkv]), at least the local window, rounded
    up to whole blocks, at most seg_start; every entry where tau is 0."""
    L = e.shape[-1]
    valid = torch.arange(L, device=e.device)[None, None, :] < seg_starts[:, None, None]
    er = torch.gather(e, 2, rank.long()).masked_fill(~valid, 0.0)
    after = er.flip(-1).cumsum(-1).flip(-1)                 # mass of entries t.. (suffix sums: no cancellation)
    tau = tau_kv.to(e.device, torch.float32)[None, :, None]
    n = (after > tau).sum(-1).clamp(min=local_window)       # after[] is non-increasing
    seg = seg_starts[:, None].to(n.dtype)
    n = ((n + block_size - 1) // block_size * block_size).minimum(seg)
    return torch.where(tau[..., 0] > 0, n, seg).to(torch.int32)


def check_settings(stop: str, local_window: int, compensate: bool, tail_estimate: str,
                   samples: int = SAMPLES, mass_reduce: str = "mean", rank_given: bool = False,
                   audit: bool = False, audit_last: int = 0) -> None:
    """The early-stop settings (module doc), checked once for the reference and the kernel alike (rank_given:
    the caller overrides the rank or its length)."""
    if audit and stop != "planned":
        raise ValueError("audit needs stop='planned' (it audits the blocks the planned budget leaves out)")
    if audit_last < 0 or (audit_last and not audit):
        raise ValueError(f"audit_last must be >= 0 and needs audit=True, got {audit_last} (audit={audit})")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if mass_reduce not in MASS_REDUCES:
        raise ValueError(f"mass_reduce must be one of {MASS_REDUCES}, got {mass_reduce!r}")
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    if tail_estimate not in TAIL_ESTIMATES:
        raise ValueError(f"tail_estimate must be one of {TAIL_ESTIMATES}, got {tail_estimate!r}")
    if local_window < 0:
        raise ValueError(f"local_window must be >= 0, got {local_window}")
    if stop == "planned" and rank_given:
        raise ValueError("stop='planned' plans its own rank and budget (no rank override)")
    if compensate and stop != "remaining":
        raise ValueError("compensate needs stop='remaining' (it keeps that rule's predicted unvisited mass)")


def remaining_ratio(e: torch.Tensor, rank: torch.Tensor, seg_starts: torch.Tensor, block_size: int) -> torch.Tensor:
    """R[s, h, b] = (estimated mass of virtual blocks after b) / (estimated mass of block b), fp32
    [n_seg, Hkv, ceil(L / block_size)], from the estimate e [n_seg, Hkv, L] gathered in rank order (only the
    first seg_start entries of a row count).  Computed in log space (no underflow); 0 for the last block."""
    n_seg, Hkv, L = e.shape
    nb = -(-L // block_size)
    er = torch.gather(e.float(), 2, rank.long())
    valid = torch.arange(L, device=e.device)[None, None, :] < seg_starts[:, None, None]
    er = er.masked_fill(~valid, -math.inf)
    er = torch.nn.functional.pad(er, (0, nb * block_size - L), value=-math.inf)
    blk = torch.logsumexp(er.view(n_seg, Hkv, nb, block_size), -1)            # log mass of each block
    after = torch.logcumsumexp(blk.flip(-1), -1).flip(-1)                      # log mass of blocks >= b
    after = torch.cat([after[..., 1:], after.new_full((n_seg, Hkv, 1), -math.inf)], -1)   # blocks > b
    ratio = torch.exp((after - blk).clamp(max=80.0))
    return torch.nan_to_num(ratio, nan=0.0)                                     # (-inf) - (-inf): empty block


def value_means(v: torch.Tensor, seg_starts: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean value vector of the keys [0, seg_start) per KV head, fp32 [n_seg, Hkv, D] (zeros for
    seg_start 0).  v: [L, Hkv, D].  Prefix sums at ``chunk`` granularity (the segment size: every seg_start is a
    multiple of it), which keeps the fp32 table small and needs no host check."""
    L, Hkv, D = v.shape
    n_full = L // chunk                                    # a seg_start < L never needs the partial last chunk
    if n_full == 0:
        return v.new_zeros(seg_starts.shape[0], Hkv, D, dtype=torch.float32)
    csum = torch.cumsum(v[:n_full * chunk].view(n_full, chunk, Hkv, D).sum(1, dtype=torch.float32), 0)
    idx = (seg_starts // chunk - 1).clamp(min=0)
    means = csum[idx] / seg_starts.clamp(min=1).float()[:, None, None]
    return means * (seg_starts > 0).float()[:, None, None]


FP32_MAX = torch.finfo(torch.float32).max


def tau_per_head(tau, n_kv_heads: int, device) -> torch.Tensor:
    """tau as a float or a [Hkv] tensor -> fp32 [Hkv] tensor (validated: finite, >= 0).  A finite tau beyond
    fp32's range becomes fp32's largest, not inf: it already exceeds any row's mass (tau is a share of it), so
    the result is the same."""
    t = torch.as_tensor(tau, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(n_kv_heads)
    if t.numel() != n_kv_heads:
        raise ValueError(f"tau must be a float or one value per KV head ({n_kv_heads}), got {t.numel()} values")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"tau must be finite and >= 0 (0 = dense), got {t.tolist()}")
    return t.clamp(max=FP32_MAX).to(torch.float32).contiguous().to(device)


def rank_keys(q: torch.Tensor, k: torch.Tensor, *, segment_size: int, sm_scale: float,
              group_reduce: str = "max", n_sample: int = 0, recent: int = RECENT) -> torch.Tensor:
    """Rank index [n_seg, Hkv, L] int32 for the segments of ``segment_range`` (see module doc)."""
    L, Tq = k.shape[0], q.shape[0]
    segs = segment_range(L, Tq, segment_size)
    seg_starts = torch.tensor([s * segment_size for s in segs], dtype=torch.int64).to(q.device, non_blocking=True)
    e = estimate_scores(q, k, segment_size=segment_size, sm_scale=sm_scale, group_reduce=group_reduce,
                        n_sample=n_sample)
    return rank_from_scores(e, seg_starts, recent)


def s2o_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tau, block_size: int = 128,
                      segment_size: int = 2048, q_tile: int = 128, sm_scale: float | None = None,
                      stop: str = "block", local_window: int = 0, compensate: bool = False,
                      tail_estimate: str = "flat", rank: torch.Tensor | None = None, rank_len: torch.Tensor | None = None,
                      samples: int = SAMPLES, mass_reduce: str = "mean", audit: bool = False, audit_last: int = 0):
    """S2O attention of one causal sequence in fp32 (module doc for the semantics).

    q: [Tq, Hq, D], the last Tq positions of k, v: [L, Hkv, D].  tau: float or [Hkv] (one per KV head).
    stop: "block" (v1), "remaining" (v2) or "planned" (v3, with ``samples`` rows per segment; v4 adds ``audit``,
    v5 limits it to the tiles of the last ``audit_last`` positions);
    local_window:
    keys just before each segment, ranked first and always visited; compensate: keep the predicted unvisited
    mass (v2); tail_estimate: "flat" or "estimate".
    rank: optional [n_seg, Hkv, L] index array (default ``rank_keys``); rank_len: optional [n_seg, Hkv]
    number of rank entries to visit (baselines; default seg_start, i.e. all earlier keys).
    Returns out [Tq, Hq, D] fp32, lse [Tq, Hq] fp32 (natural log), and
    counts: dict(computed [Hq], causal [Hq]) score blocks.
    """
    _check(q, k, v, block_size, segment_size, q_tile)
    check_settings(stop, local_window, compensate, tail_estimate, samples, mass_reduce,
                   rank_given=rank is not None or rank_len is not None, audit=audit, audit_last=audit_last)
    Tq, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    prefix = L - Tq
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    tau_kv = tau_per_head(tau, Hkv, q.device)
    tau_h = tau_kv.repeat_interleave(G)                                         # [Hq]
    segs = segment_range(L, Tq, segment_size)
    seg_starts = torch.tensor([s * segment_size for s in segs], device=q.device, dtype=torch.int64)
    audit_log_tau = None
    if stop == "planned":
        if float(tau_h.max()) > 0:
            if audit:
                audit_log_tau = torch.log(tau_h)                     # [Hq]; -inf where tau is 0: audit all
            e = sampled_mass(q, k, segment_size=segment_size, sm_scale=scale, n_sample=samples, reduce=mass_reduce)
            rank = rank_by_mass(e, seg_starts, local_window)
            rank_len = planned_budget(e, rank, seg_starts, tau_kv, block_size, local_window)
        tau_h = torch.zeros_like(tau_h)                             # the budget is the whole rule
        local_window = 0
    use_ratio = stop == "remaining" and tail_estimate == "estimate"
    e = estimate_scores(q, k, segment_size=segment_size, sm_scale=scale) if rank is None or use_ratio else None
    if rank is None:
        rank = rank_from_scores(e, seg_starts, recent=local_window)
    forced = -(-local_window // block_size)                         # leading rank blocks never stopped in
    if use_ratio:
        ratio = remaining_ratio(e, rank, seg_starts, block_size).repeat_interleave(G, 1)  # [n_seg, Hq, nb]
    vbar = value_means(v, seg_starts, chunk=segment_size).repeat_interleave(G, 1) if compensate else None     # [n_seg, Hq, D]
    qf, kf, vf = q.float(), k.float(), v.float()
    kh = kf.repeat_interleave(G, 1).transpose(0, 1)                 # [Hq, L, D]
    vh = vf.repeat_interleave(G, 1).transpose(0, 1)
    out = torch.zeros(Tq, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.zeros(Tq, Hq, dtype=torch.float32, device=q.device)
    computed = torch.zeros(Hq, dtype=torch.int64, device=q.device)
    causal = torch.zeros(Hq, dtype=torch.int64, device=q.device)
    heads = torch.arange(Hq, device=q.device)
    for si, s in enumerate(segs):
        seg_start = s * segment_size
        n_rank = torch.full((Hkv,), seg_start, device=q.device) if rank_len is None else rank_len[si]
        n_blocks_h = ((n_rank + block_size - 1) // block_size).repeat_interleave(G)   # [Hq]
        lo, hi = max(prefix, seg_start), min(L, seg_start + segment_size)
        for t0 in range(lo // q_tile * q_tile, hi, q_tile):
            rows = torch.arange(max(t0, lo), min(t0 + q_tile, hi), device=q.device)   # abs positions
            last = int(rows[-1])
            qt = qf[rows - prefix].transpose(0, 1)                  # [Hq, M, D]
            # 1. intra pass: dense causal over [seg_start, last]
            kpos = torch.arange(seg_start, last + 1, device=q.device)
            sc = qt @ kh[:, kpos].transpose(1, 2) * scale           # [Hq, M, N]
            sc = sc.masked_fill(kpos[None, None, :] > rows[None, :, None], -math.inf)
            m = sc.amax(-1)                                         # [Hq, M]
            p = torch.exp(sc - m[..., None])
            l = p.sum(-1)
            acc = p @ vh[:, kpos]                                   # [Hq, M, D]
            intra_blocks = -(-(last + 1 - seg_start) // block_size)
            computed += intra_blocks
            causal += intra_blocks + seg_start // block_size
            # 2. ranked pass, one virtual block at a time, per-head early stop
            rem = torch.zeros_like(l)                               # predicted unvisited mass at the stop
            active = n_blocks_h > 0
            for b in range(int(n_blocks_h.max()) if Hq else 0):
                if not bool(active.any()):
                    break
                idx = rank[si, :, b * block_size:(b + 1) * block_size].long()      # [Hkv, B]
                ok = (torch.arange(b * block_size, b * block_size + idx.shape[1], device=q.device)[None]
                      < n_rank[:, None]).repeat_interleave(G, 0)                  # [Hq, B]
                idx = idx.repeat_interleave(G, 0)                                 # [Hq, B]
                kb = kh[heads[:, None], idx]                                      # [Hq, B, D]
                vb = vh[heads[:, None], idx]
                sc = (qt @ kb.transpose(1, 2) * scale).masked_fill(~ok[:, None, :], -math.inf)
                m_new = torch.maximum(m, sc.amax(-1))
                alpha = torch.exp(m - m_new)
                p = torch.exp(sc - m_new[..., None])
                block_mass = p.sum(-1)
                prev_mass = l * alpha
                upd = active[:, None]
                m = torch.where(upd, m_new, m)
                l = torch.where(upd, prev_mass + block_mass, l)
                acc = torch.where(upd[..., None], acc * alpha[..., None] + p @ vb, acc)
                computed += active.long()
                if stop == "block":
                    small = block_mass < tau_h[:, None] * prev_mass
                    tail = torch.zeros_like(block_mass)
                else:
                    left = ratio[si, :, b] if use_ratio else (n_blocks_h - 1 - b).clamp(min=0).float()
                    tail = block_mass * left[:, None]                             # predicted mass after b
                    small = tail < tau_h[:, None] * (prev_mass + block_mass)
                stop_now = small.all(-1) & active & (b >= forced)
                rem = torch.where(stop_now[:, None], tail, rem)
                active = active & ~(stop_now | (b + 1 >= n_blocks_h))
            if audit_log_tau is not None and (audit_last == 0 or last >= L - audit_last):
                m, l, acc = _audit(qt, kh, vh, rank[si], n_blocks_h, seg_start, block_size, scale, audit_log_tau,
                                   m, l, acc, computed)
            if compensate:
                acc = acc + rem[..., None] * vbar[si][:, None, :]
                l = l + rem
            out[rows - prefix] = (acc / l[..., None]).transpose(0, 1)
            lse[rows - prefix] = (m + torch.log(l)).transpose(0, 1)
    return out, lse, {"computed": computed, "causal": causal}


def _audit(qt, kh, vh, rank_row, first_block, seg_start: int, block_size: int, scale: float, log_tau, m, l, acc,
           computed):
    """The audit of the ranked blocks after each head's planned ones (module doc), in rank order.  qt [Hq, M, D]
    (the tile's rows), kh / vh [Hq, L, D], rank_row [Hkv, L], first_block / log_tau [Hq]; updates ``computed``
    in place and returns the online-softmax state (m, l, acc)."""
    Hq = qt.shape[0]
    G = Hq // rank_row.shape[0]
    heads = torch.arange(Hq, device=qt.device)
    threshold = m + torch.log(l) + log_tau[:, None]                                 # [Hq, M]: after the plan
    for b in range(int(first_block.min()), -(-seg_start // block_size)):
        due = b >= first_block                                                      # [Hq]
        idx = rank_row[:, b * block_size:min((b + 1) * block_size, seg_start)].long().repeat_interleave(G, 0)
        sc = qt @ kh[heads[:, None], idx].transpose(1, 2) * scale                     # [Hq, M, B]
        hit = (sc.amax(-1) > threshold).any(-1) & due                               # [Hq]
        m_new = torch.maximum(m, sc.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(sc - m_new[..., None])
        upd = hit[:, None]
        l = torch.where(upd, l * alpha + p.sum(-1), l)
        acc = torch.where(upd[..., None], acc * alpha[..., None] + p @ vh[heads[:, None], idx], acc)
        m = torch.where(upd, m_new, m)
        computed += hit.long()
    return m, l, acc


def dense_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None):
    """Dense causal fp32 attention (queries = last Tq positions).  Returns out [Tq, Hq, D], lse [Tq, Hq]."""
    Tq, Hq, D = q.shape
    L, Hkv, _ = k.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    kh = k.float().repeat_interleave(Hq // Hkv, 1).transpose(0, 1)
    vh = v.float().repeat_interleave(Hq // Hkv, 1).transpose(0, 1)
    sc = q.float().transpose(0, 1) @ kh.transpose(1, 2) * scale     # [Hq, Tq, L]
    qpos = torch.arange(L - Tq, L, device=q.device)
    sc = sc.masked_fill(torch.arange(L, device=q.device)[None, None, :] > qpos[None, :, None], -math.inf)
    lse = torch.logsumexp(sc, -1)
    out = torch.softmax(sc, -1) @ vh
    return out.transpose(0, 1), lse.transpose(0, 1)
