"""A second, independent generator of long-context attention inputs: heads of distinct TYPES.

``make_qkv`` (inputs.py) gives every head a mixture of the same planted patterns.  A sparse method tuned on
it may fail on heads that look different, so this generator is built another way, to judge generalisation:
every q head gets ONE type, and the vectors are built directly in the post-RoPE space.

Construction (per KV head; the q heads of its group draw their types independently):
  * relative part, the first 3D/4 dims (P = 3D/8 rotation pairs, interleaved, RoPE-like frequencies
    theta_f = 1e6^(-f/P)): k_j += R(j) a, with a random pair-vector a (every pair has the same norm).  A
    query q_i += R(i) R(-delta) (w * a) gives the logit ~ sum_f w_f |a_f|^2 cos((i - j - delta) theta_f):
    a function of i - j only, peaked at i - j = delta.
  * content part (position free), the last D/4 dims, disjoint from the relative part (no cross terms):
    orthonormal directions u_sink and u_r (one per retrieval event).  Keys 0..n_sink-1 carry u_sink; each
    retrieval event's keys carry its u_r.
  * noise: every key has N(0, 1) coordinates; every query has isotropic noise scaled to give logit noise of
    std sigma_h nats against the keys (features included).
Head types (probabilities 0.2 / 0.3 / 0.2 / 0.15 / 0.15):
  * ``sink``: q carries u_sink: the first n_sink (1..4) keys take most of the mass.
  * ``local``: relative part with w_f = 1 on the pairs whose period lies in [2 pi W, 16 pi W], W
    log-uniform in [64, 2048], delta = 0: those pairs stay in phase for i - j << W and dephase beyond, so
    the logit is a plateau of width ~W along the diagonal (a band holding most of the mass over ~W keys:
    ~90 % within W, ~97 % within 4W for the last query at 32K); beyond it a ripple of std ~0.25 x peak
    (5-8 pairs: the rank limit of D dims, as in real RoPE heads), not exactly zero.
  * ``retrieval``: 2..4 events per KV head; event r has 100..400 keys scattered uniformly over [0, start_r)
    (no key in two events, none a sink key) and a query RANGE [start_r, start_r + len_r) (len_r = 1/8..1/3 of
    L; ranges may overlap).  A retrieval head's queries carry u_r only inside event r's range: the scattered
    keys matter there and nowhere else.  Outside every range
    the head is a sink head (sink logit 0..2 nats below the pattern peak).
  * ``slash``: relative part with w_f = 1 on the pairs whose period is <= 2 pi * 1024, and delta = one or two
    offsets, log-uniform in [16, min(8192, L/2)]: one or two diagonal stripes i - j = delta, sharp (the
    high frequencies) with a power-law-like fall-off over a few tokens around them (measured: 50-99 % of a
    row's mass within 32 of the stripes), peak 2 nats above the other types' (one key per row), plus a
    weaker sink, as real slash heads have.  (With every pair, the low frequencies would keep the stripe
    tens of tokens wide.)
  * ``noise``: no pattern, query noise only (sigma 0.3..0.8 nats): near-uniform attention over all causal
    keys.  No sparse method should claim a low error there at low density.
Strengths: a pattern's peak logit is ln(L) + U(2, 5) nats (slash + 2): one peak key outweighs the whole noise
floor (L keys of logit ~N(0, sigma^2), sigma_h in [0.5, 1.2] for the pattern heads) by e^(2..5 - sigma^2/2),
at every L.
Values: v_j = m * mu + N(0, 1) with mu a unit direction per KV head and m in [0.5, 1.5] * sqrt(D) / 4 (real V
has a nonzero mean: dropping mass then biases the output, not only adds noise); the sink keys' values are
scaled by 0.1 (sinks carry little value in trained models).
Deterministic for a given seed, device and arguments; the head types and their parameters depend on the seed
alone (not on L or the device).  The generator itself runs in fp32 on ``device``.

Measured (H200, seed 1, 32 q / 8 KV heads, d 128, segment 2048): the per-row token oracle
(``baselines.token_oracle``) needs, to hold 99 % of every row's mass, 0.42 of the causal keys at 8K and 0.26 at
32K (make_qkv, seed 1: 0.26 and 0.075); per type at 32K: sink 0.18, local 0.10, retrieval 0.23, slash 0.07,
noise 0.97.  So these inputs are harder than make_qkv's, by design: the noise heads (4 of 32 at seed 1) and the
tails of the sink heads cannot be made sparse.
"""

from __future__ import annotations

import math

import torch

HEAD_TYPES = ("sink", "local", "retrieval", "slash", "noise")
TYPE_PROBS = (0.2, 0.3, 0.2, 0.15, 0.15)
ROPE_BASE = 1e6
SLASH_PERIOD = 1024


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2f], x[2f+1]) of x [D] by angles given as cos, sin [..., D/2]
    -> [..., D]."""
    x1, x2 = x[0::2], x[1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def make_qkv_mixed(L: int, Hq: int = 32, Hkv: int = 8, D: int = 128, *, seed: int, dtype=torch.bfloat16,
                   device="cpu", return_info: bool = False):
    """q [L, Hq, D], k/v [L, Hkv, D] in ``dtype`` on ``device``; see the module doc.  With return_info, also a
    dict: ``types`` (list of Hq type names), ``width`` [Hq] (local band W, else 0), ``offsets`` (per q head, a
    list of slash offsets), ``n_sink`` [Hkv], ``events`` (per KV head, a list of (key positions [n] int64,
    query range start, end))."""
    if Hq % Hkv or D % 8 or D < 32:
        raise ValueError(f"need Hq a multiple of Hkv and D a multiple of 8, >= 32; got Hq={Hq}, Hkv={Hkv}, D={D}")
    # head types and every scalar / per-head parameter come from a CPU generator, in an order that does not
    # depend on L or the device: a seed gives the same heads at every length; the [L, ...] noise comes from a
    # generator on the device
    pgen = torch.Generator().manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    G = Hq // Hkv
    n_pairs = 3 * D // 8                  # relative part: dims [0, 2 * n_pairs); content: the rest
    n_rel = 2 * n_pairs
    f32 = dict(device=device, dtype=torch.float32)

    def uni(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=pgen).item()

    def randint(lo, hi):  # [lo, hi)
        return int(torch.randint(lo, hi, (), generator=pgen))

    def small_randn(*shape):  # L-independent draws, moved to the device
        return torch.randn(*shape, generator=pgen).to(device)

    theta = ROPE_BASE ** (-torch.arange(n_pairs, **f32).double() / n_pairs)        # [P]
    period = 2 * math.pi / theta
    pos = torch.arange(L, device=device, dtype=torch.float64)
    rot = pos[:, None] * theta[None, :]                                               # [L, P] fp64
    cos, sin = rot.cos().float(), rot.sin().float()
    sq = math.sqrt(D)
    lnL = math.log(max(L, 2))

    # built head-major ([H, L, D], contiguous per head), returned as [L, H, D]
    k = torch.randn(Hkv, L, D, generator=gen, **f32)
    q = torch.empty(Hq, L, D, **f32)
    v = torch.randn(Hkv, L, D, generator=gen, **f32)
    info = {"types": [], "width": torch.zeros(Hq), "offsets": [], "n_sink": torch.zeros(Hkv, dtype=torch.int64),
            "events": []}
    probs = torch.tensor(TYPE_PROBS)
    # key-side feature magnitude: large beside the unit key noise, so the noise x feature cross terms of a
    # query stay well under a nat (q = logit * sq / KEY_NORM along the feature)
    key_norm = 4.0 * sq
    for hk in range(Hkv):
        # relative part: unit norm per pair, random phase, scaled to key_norm in total
        phase = 2 * math.pi * torch.rand(n_pairs, generator=pgen).to(device)
        a = torch.stack([phase.cos(), phase.sin()], -1).flatten() * (key_norm / math.sqrt(n_pairs))  # [2P]
        k[hk, :, :n_rel] += _rotate(a, cos, sin)
        # content directions, orthonormal, in the content dims (position free)
        n_events = randint(2, 5)
        basis = torch.zeros(1 + n_events, D, **f32)
        basis[:, n_rel:] = torch.linalg.qr(small_randn(D - n_rel, 1 + n_events)).Q.T
        n_sink = min(L, randint(1, 5))
        info["n_sink"][hk] = n_sink
        k[hk, :n_sink] += key_norm * basis[0]
        events = []
        used = torch.zeros(L, dtype=torch.bool, device=device)
        used[:n_sink] = True
        for r in range(n_events):
            start = max(1, int(L * uni(1 / 8, 3 / 4)))
            length = max(1, int(L * uni(1 / 8, 1 / 3)))
            n_keys = randint(100, 401)
            free = torch.nonzero(~used[:start]).flatten()            # events never share a key
            pick = torch.randperm(free.numel(), generator=gen, device=device)[:n_keys]
            keys = free[pick].sort().values
            used[keys] = True
            k[hk, keys] += key_norm * basis[1 + r]
            events.append((keys, start, min(L, start + length)))
        info["events"].append(events)
        mean_dir = small_randn(D)
        v[hk] += uni(0.5, 1.5) * (sq / 4) * mean_dir / mean_dir.norm()
        v[hk, :n_sink] *= 0.1

        for g in range(G):
            h = hk * G + g
            kind = HEAD_TYPES[int(torch.multinomial(probs, 1, generator=pgen))]
            info["types"].append(kind)
            offsets = []
            sigma = uni(0.3, 0.8) if kind == "noise" else uni(0.5, 1.2)
            # per-coordinate std s gives logit std s * sqrt(D + feature norm^2) / sqrt(D) against a key
            q[h] = torch.randn(L, D, generator=gen, **f32) * (sigma / math.sqrt(1 + key_norm ** 2 / D))
            peak = lnL + uni(2.0, 5.0)                   # nats

            def along(direction, logit):                 # query component giving ``logit`` on a key feature
                return (logit * sq / key_norm) * direction

            if kind in ("sink", "slash", "retrieval"):
                sink_logit = peak if kind == "sink" else peak - uni(0.0, 2.0)
                q[h] += along(basis[0], sink_logit)
            if kind == "local":
                W = math.exp(uni(math.log(64), math.log(2048)))
                info["width"][h] = W
                w = ((period >= 2 * math.pi * W) & (period <= 16 * math.pi * W)).float()
                logit = peak
                qa = (a.view(n_pairs, 2) * w[:, None].float()).flatten() * (n_pairs / w.sum().item())
                q[h, :, :n_rel] += _rotate(along(qa / key_norm, logit), cos, sin)
            if kind == "slash":
                hi = max(17.0, min(8192.0, L / 2))
                for _ in range(randint(1, 3)):
                    delta = int(round(math.exp(uni(math.log(16), math.log(hi)))))
                    offsets.append(delta)
                    back = -float(delta) * theta                                   # R(-delta)
                    w = (period <= 2 * math.pi * SLASH_PERIOD).float()
                    qa = _rotate(a, back.cos().float(), back.sin().float()) * w.repeat_interleave(2)
                    qa = qa * (n_pairs / w.sum().item())
                    q[h, :, :n_rel] += _rotate(along(qa / key_norm, peak + 2.0), cos, sin)
            if kind == "retrieval":
                for r, (_, start, end) in enumerate(events):
                    q[h, start:end] += along(basis[1 + r], peak)
            info["offsets"].append(offsets)
    out = tuple(x.transpose(0, 1).contiguous().to(dtype) for x in (q, k, v))
    return out + (info,) if return_info else out
