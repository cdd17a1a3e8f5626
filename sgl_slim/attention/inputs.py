"""Seeded generator of realistic long-context attention inputs (q, k, v), the same for every method.

Real prefill attention maps are mixtures of a few patterns (MInference, FlexPrefill, XAttention):
attention sinks, local windows, vertical stripes on a few key positions and slash (diagonal) stripes.
``make_qkv`` plants each pattern as a component of the pre-RoPE q/k vectors, then applies RoPE
(Llama-3 half-split convention, base 500000), so every pattern arises from q.k exactly as in a model:

  * sink:     keys 0..3 get +c*u (u: unit vector in the 8 LOWEST-frequency RoPE pairs, which barely
              rotate over 128K positions), a head's queries get +c_h*u  -> column 0..3 everywhere.
  * vertical: 32 random key positions per KV head get +c*w (w: low-frequency, orthogonal to u);
              queries get +c_h*w  -> a few bright columns.
  * local:    every key and query gets +c*a (a: random in the pairs with period <= 512 tokens);
              the dot is sum_f |a_f|^2 cos((i-j) theta_f)  -> a band near the diagonal.
  * slash:    like local, but the query component is pre-rotated by -delta_h  -> a diagonal stripe at
              distance delta_h (64 .. 4096).
  * noise:    N(0, 1) in every coordinate (logit noise std ~1).

Strengths are logit boosts in nats (after the 1/sqrt(D) scale), drawn per QUERY head, so heads of one
KV group mix the same key features differently: sink 10..14, vertical 7..11 (0 with prob. 0.3), local
8..12, slash 7..11 (0 with prob. 0.5), each plus ln(L / 4096) for L > 4096.  That growth keeps the
noise floor (L keys of ~e^0.5 each) at a roughly constant share of the mass, about 1-5 % for the
weakest heads: published top-k recall for Llama-3 at long context (a few % of the keys hold > 95 % of
the mass) says real tails are that light; without the growth, uniform noise would dominate every head
at 128K.  (A first calibration 2 nats lower put 10-30 % of the mass in the noise floor: then no
sparse method, S2O or baseline, got under 2 % rel-L2 below density 0.85 at 8K.)
Values are N(0, 1).  Deterministic for a given seed and device.

What it imitates, and what it does not (measured against the model trained in ``sgl_slim.testbed``, 32K,
benchmarks/testbed.md): this generator is SINK-heavy (sinks hold 19-93% of a head's mass, the local band 1-4%),
like published Llama-3 maps.  The small trained model has no sinks at all (< 1e-4) and keeps 84% of its mass in
the 128 keys before each query (layers 1-4 up to 99.9%), with a diffuse tail only in its first and last layers.
So numbers on this generator say how a method handles sinks and scattered stripes; judge locality on
``inputs_mixed.make_qkv_mixed`` (typed heads) and on the testbed's real q/k/v.
"""

from __future__ import annotations

import math

import torch


def rope(x: torch.Tensor, pos: torch.Tensor, base: float = 500000.0) -> torch.Tensor:
    """Half-split RoPE.  x: [T, H, D] fp32, pos: [T] (or broadcastable) -> [T, H, D]."""
    D = x.shape[-1]
    inv = base ** (-torch.arange(0, D // 2, device=x.device, dtype=torch.float64) * 2 / D)
    ang = (pos.double()[:, None] * inv[None, :]).float()            # [T, D/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def _unit_in_pairs(pairs: torch.Tensor, D: int, gen: torch.Generator, device) -> torch.Tensor:
    e = torch.zeros(D, device=device)
    idx = torch.cat([pairs, pairs + D // 2])
    e[idx] = torch.randn(idx.numel(), generator=gen, device=device)
    return e / e.norm()


def make_qkv(L: int, Hq: int = 32, Hkv: int = 8, D: int = 128, *, seed: int = 0, dtype=torch.bfloat16,
             device="cpu", rope_base: float = 500000.0):
    """q [L, Hq, D], k/v [L, Hkv, D] in ``dtype`` on ``device``; see the module doc."""
    gen = torch.Generator(device=device).manual_seed(seed)
    G = Hq // Hkv
    sq = math.sqrt(D)
    half = D // 2
    theta = rope_base ** (-torch.arange(half, device=device, dtype=torch.float64) * 2 / D)
    low_pairs = torch.arange(half - 8, half, device=device)
    high_pairs = torch.nonzero(2 * math.pi / theta <= 512).flatten()

    def uni(lo, hi, n):
        return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)

    q = torch.randn(L, Hq, D, generator=gen, device=device)
    k = torch.randn(L, Hkv, D, generator=gen, device=device)
    v = torch.randn(L, Hkv, D, generator=gen, device=device)
    # per query head strengths (nats)
    grow = max(0.0, math.log(L / 4096))  # keeps the noise floor's share of the mass ~constant in L
    b_sink = uni(10, 14, Hq) + grow
    b_vert = (uni(7, 11, Hq) + grow) * (torch.rand(Hq, generator=gen, device=device) > 0.3)
    b_loc = uni(4, 8, Hq) + grow
    b_sl = (uni(5, 9, Hq) + grow) * (torch.rand(Hq, generator=gen, device=device) > 0.5)
    delta = torch.exp(uni(math.log(8), math.log(1024), Hq)).round()
    pos = torch.arange(L, device=device)
    for hk in range(Hkv):
        u = _unit_in_pairs(low_pairs, D, gen, device)
        w = _unit_in_pairs(low_pairs, D, gen, device)
        w = w - (w @ u) * u
        w = w / w.norm()
        a = _unit_in_pairs(high_pairs, D, gen, device)
        s = _unit_in_pairs(high_pairs, D, gen, device)
        ck = math.sqrt(sq)  # key side scale; query side carries the per-head boost
        k[: min(4, L), hk] += ck * u * 2
        stripes = torch.randint(0, L, (32,), generator=gen, device=device)
        k[stripes, hk] += ck * w * 2
        k[:, hk] += ck * (a + s)
        for g in range(G):
            h = hk * G + g
            q[:, h] += (b_sink[h] * sq / (2 * ck)) * u + (b_vert[h] * sq / (2 * ck)) * w
            q[:, h] += (b_loc[h] * sq / ck) * a
            if b_sl[h] > 0:
                s_rot = rope(s.view(1, 1, D), -delta[h].view(1), rope_base).view(D)
                q[:, h] += (b_sl[h] * sq / ck) * s_rot
    q = rope(q, pos, rope_base)
    k = rope(k, pos, rope_base)
    return q.to(dtype), k.to(dtype), v.to(dtype)
