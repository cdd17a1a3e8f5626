"""Sparse-attention baselines, the token oracle and the mixed-head input generator, on the CPU at tiny shapes.

Oracles are computed here independently (explicit masks, per-row loops).  Tolerances: everything runs in fp32;
two fp32 softmax-attention computations of the same kept set differ by summation order only (~1e-6 relative at
these sizes), so 1e-5 absolute on outputs of unit scale leaves room for that and nothing else."""

import math

import pytest
import torch

from sgl_slim.attention import dense_attention_ref, s2o_attention_ref
from sgl_slim.attention.baselines import select_cumulative_blocks, select_vertical_slash, token_oracle
from sgl_slim.attention.inputs import make_qkv
from sgl_slim.attention.inputs_mixed import HEAD_TYPES, make_qkv_mixed
from sgl_slim.attention.s2o_ref import segment_range

B, S = 32, 128          # block_size, segment_size
SCALE = 32 ** -0.5      # head dim 32
SCALE_64 = 64 ** -0.5   # head dim 64 (the planted-lines test)


def _selections():
    return {
        "vertical_slash": lambda q, k: select_vertical_slash(q, k, block_size=B, segment_size=S, sm_scale=SCALE,
                                                             n_vertical=12, n_slash=3, last_q=16),
        "vertical_slash_gamma": lambda q, k: select_vertical_slash(q, k, block_size=B, segment_size=S,
                                                                   sm_scale=SCALE, gamma=0.8, last_q=16),
        "cumulative_blocks": lambda q, k: select_cumulative_blocks(q, k, gamma=0.9, block_size=B, segment_size=S,
                                                                   sm_scale=SCALE, last_q=16),
    }


def _masked_attention(q, k, v, rank, rank_len, segment_size):
    """Brute force: each query row attends its segment's selected earlier keys plus [seg_start, itself]."""
    Tq, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    prefix = L - Tq
    allowed = torch.zeros(Hq, Tq, L, dtype=torch.bool)
    for r in range(Tq):
        i = prefix + r
        si = i // segment_size - prefix // segment_size
        seg_start = i // segment_size * segment_size
        allowed[:, r, seg_start:i + 1] = True
        for h in range(Hq):
            allowed[h, r, rank[si, h // G, : rank_len[si, h // G]].long()] = True
    kh = k.float().repeat_interleave(G, 1).transpose(0, 1)
    vh = v.float().repeat_interleave(G, 1).transpose(0, 1)
    s = (q.float().transpose(0, 1) @ kh.transpose(1, 2) * SCALE).masked_fill(~allowed, -math.inf)
    return (torch.softmax(s, -1) @ vh).transpose(0, 1)


# ------------------------------------------------------------------------------------------ selections
@pytest.mark.parametrize("name", list(_selections()))
# one causal sequence; a cached prefix; a sequence shorter than one segment (nothing to select)
@pytest.mark.parametrize("L,Tq", [(520, 520), (520, 200), (100, 100)])
def test_selection_is_valid_and_runs_on_the_reference_kernel(name, L, Tq):
    q, k, v = make_qkv(L, 4, 2, 32, seed=3, dtype=torch.float32)
    q = q[L - Tq:]
    rank, rank_len = _selections()[name](q, k)
    segs = list(segment_range(L, Tq, S))
    assert rank.dtype == torch.int32 and rank_len.dtype == torch.int32, (rank.dtype, rank_len.dtype)
    assert rank.shape[:2] == (len(segs), 2) and rank_len.shape == (len(segs), 2), (rank.shape, rank_len.shape)
    for si, s in enumerate(segs):
        for hk in range(2):
            n = int(rank_len[si, hk])
            assert 0 <= n <= min(s * S, rank.shape[2]), f"{name}: rank_len {n} out of bounds in segment {s}"
            sel = rank[si, hk, :n]
            assert sel.unique().numel() == n, f"{name}: repeated positions in segment {s}, head {hk}"
            assert n == 0 or (int(sel.min()) >= 0 and int(sel.max()) < s * S), \
                f"{name}: positions outside [0, seg_start={s * S}) in segment {s}"
            if s > 0:
                assert n > 0, f"{name}: nothing kept in segment {s} although it has earlier keys"
    # tau 0 visits exactly the selected keys: the reference kernel equals the brute-force masked attention
    out, _, _ = s2o_attention_ref(q, k, v, tau=0.0, block_size=B, segment_size=S, q_tile=64, sm_scale=SCALE,
                                  rank=rank, rank_len=rank_len)
    ref = _masked_attention(q, k, v, rank, rank_len, S)
    err = (out - ref).abs().max().item()
    assert err < 1e-5, f"{name}: kernel reference vs brute-force masked attention differ by {err}"
    # and the selection is sparse on these structured inputs (else the comparison above would be trivial)
    assert L <= S or int(rank_len.sum()) < sum(s * S for s in segs) * 2, f"{name}: kept every earlier key"


def _planted(L=512, D=64, column=20, delta=200, strength=8.0, seed=0):
    """Keys: unit random vectors e_j (nearly orthogonal in 64 dims: cross logits ~N(0, (strength/8)^2)).
    Key ``column`` also carries a direction u that every query carries: a vertical line.  Query i carries
    e_{i - delta}: a slash line at distance ``delta``.  One KV head, two q heads."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(L, D, generator=g)
    e = e / e.norm(dim=-1, keepdim=True)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    e = e - (e @ u)[:, None] * u                      # keep the two lines apart
    k = e.clone()
    k[column] += u
    c = strength / SCALE_64
    q = torch.zeros(L, D)
    q[delta:] = c * e[: L - delta]
    q += c * u
    q = torch.stack([q, q + 0.1 * torch.randn(L, D, generator=g)], 1)
    return q, k[:, None], column, delta



def test_vertical_slash_finds_the_planted_column_and_diagonal():
    L, seg = 512, 128
    q, k, column, delta = _planted(L)
    rank, rank_len = select_vertical_slash(q, k, block_size=B, segment_size=seg, sm_scale=SCALE_64, n_vertical=1,
                                           n_slash=1, last_q=64)
    for si, s in enumerate(range(L // seg)):
        lo, hi, start = s * seg, (s + 1) * seg, s * seg
        expect = set(range(max(0, lo - delta), max(0, min(start, hi - delta))))
        if start > column:
            expect.add(column)
        got = set(rank[si, 0, : rank_len[si, 0]].tolist())
        assert got == expect, (f"segment {s}: kept {sorted(got)[:8]}.. ({len(got)}), expected the column {column} "
                               f"and the diagonal run {sorted(expect)[:8]}.. ({len(expect)})")


def _brute_cumulative_blocks(q, k, gamma, last_q):
    L, Hkv, D = k.shape
    Hq = q.shape[1]
    G = Hq // Hkv
    kept = {}
    for s in range(L // S + (L % S > 0)):
        start, hi = s * S, min(L, (s + 1) * S)
        for hk in range(Hkv):
            if start == 0:
                kept[s, hk] = set()
                continue
            mass = torch.zeros(start // B, dtype=torch.float64)
            for h in range(hk * G, (hk + 1) * G):
                for i in range(max(start, hi - last_q), hi):
                    p = torch.softmax((q[i, h].double() @ k[:start, hk].double().T) * SCALE, -1)
                    mass += p.view(-1, B).sum(-1)
            mass /= mass.sum()
            order = torch.argsort(mass, descending=True).tolist()
            chosen, acc = [], 0.0
            for b in order:
                chosen.append(b)
                acc += float(mass[b])
                if acc >= gamma:
                    break
            kept[s, hk] = {b * B + t for b in chosen for t in range(B)}
    return kept


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_cumulative_blocks_keeps_what_brute_force_keeps(gamma):
    L = 600
    q, k, _ = make_qkv(L, 4, 2, 32, seed=5, dtype=torch.float32)
    rank, rank_len = select_cumulative_blocks(q, k, gamma=gamma, block_size=B, segment_size=S, sm_scale=SCALE,
                                              last_q=16)
    want = _brute_cumulative_blocks(q, k, gamma, 16)
    for (s, hk), blocks in want.items():
        got = set(rank[s, hk, : rank_len[s, hk]].tolist())
        assert got == blocks, f"gamma {gamma}, segment {s}, head {hk}: kept {len(got)} keys, brute force {len(blocks)}"


# ------------------------------------------------------------------------------------------ token oracle
def _brute_oracle(q, k, v, mass, seg):
    L, Hq, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(L, Hq, D, dtype=torch.float64)
    kept = 0
    for h in range(Hq):
        kh, vh = k[:, h // G].double(), v[:, h // G].double()
        for i in range(L):
            p = torch.softmax((kh[: i + 1] @ q[i, h].double()) * SCALE, -1)
            start = i // seg * seg
            keep = torch.zeros(i + 1, dtype=torch.bool)
            keep[start:] = True
            acc = float(p[start:].sum())
            for j in torch.argsort(p[:start], descending=True).tolist():
                if acc >= mass:
                    break
                keep[j] = True
                acc += float(p[j])
            kept += int(keep.sum())
            out[i, h] = (p * keep) @ vh[: i + 1] / (p * keep).sum()
    return kept / (Hq * L * (L + 1) / 2), out


def test_token_oracle_matches_brute_force_and_dense_at_full_mass():
    L, seg = 150, 32
    q, k, v = make_qkv(L, 2, 1, 32, seed=7, dtype=torch.float32)
    dense, _ = dense_attention_ref(q, k, v, sm_scale=SCALE)
    dens, out = token_oracle(q, k, v, mass=1.0, segment_size=seg, sm_scale=SCALE, q_tile=40)
    assert dens == 1.0 and (out - dense).abs().max() < 1e-5, f"mass 1: density {dens}, out differs from dense"
    for mass in (0.99, 0.8):
        dens, out = token_oracle(q, k, v, mass=mass, segment_size=seg, sm_scale=SCALE, q_tile=40, max_elems=4000)
        want_dens, want = _brute_oracle(q, k, v, mass, seg)
        assert abs(dens - want_dens) < 1e-9, f"mass {mass}: density {dens}, brute force {want_dens}"
        assert (out - want.float()).abs().max() < 1e-5, f"mass {mass}: output differs from the brute force"


def test_token_oracle_density_and_error_follow_the_mass():
    L, seg = 512, 128
    q, k, v = make_qkv(L, 4, 2, 32, seed=8, dtype=torch.float32)
    dense, _ = dense_attention_ref(q, k, v, sm_scale=SCALE)
    dens, errs = [], []
    for mass in (1.0, 0.999, 0.99, 0.9):
        d, out = token_oracle(q, k, v, mass=mass, segment_size=seg, sm_scale=SCALE)
        dens.append(d)
        errs.append(((out - dense).norm() / dense.norm()).item())
    assert all(a > b for a, b in zip(dens, dens[1:])), f"density must fall with the mass: {dens}"
    assert all(a <= b for a, b in zip(errs, errs[1:])), f"error must not fall with the mass: {errs}"
    assert errs[0] < 1e-5 and errs[-1] > 1e-3, f"errors {errs}"


# ------------------------------------------------------------------------------------------ mixed inputs
@pytest.fixture(scope="module")
def mixed():
    return make_qkv_mixed(2048, 32, 8, 64, seed=0, dtype=torch.float32, return_info=True)


def test_mixed_generator_is_deterministic_per_seed():
    q, k, v = make_qkv_mixed(600, 8, 2, 32, seed=0, dtype=torch.float32)
    q2, k2, v2 = make_qkv_mixed(600, 8, 2, 32, seed=0, dtype=torch.float32)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2), "same seed, different tensors"
    q3, _, _ = make_qkv_mixed(600, 8, 2, 32, seed=1, dtype=torch.float32)
    assert not torch.equal(q, q3), "different seeds gave the same tensors"
    # the heads (types, widths, events' query ranges as fractions of L) do not depend on the length
    a = make_qkv_mixed(600, 8, 2, 32, seed=0, dtype=torch.float32, return_info=True)[3]
    b = make_qkv_mixed(1500, 8, 2, 32, seed=0, dtype=torch.float32, return_info=True)[3]
    assert a["types"] == b["types"] and torch.equal(a["width"], b["width"]), "head types changed with L"
    assert [len(e) for e in a["events"]] == [len(e) for e in b["events"]], "retrieval events changed with L"


def test_mixed_values_have_a_mean_direction(mixed):
    _, _, v, _ = mixed
    mean_norm = v.mean(0).norm(dim=-1)                                  # [Hkv]
    noise_only = math.sqrt(64 / 2048)                                   # norm of the mean of 2048 N(0, I_64)
    assert (mean_norm > 5 * noise_only).all(), f"V mean norms {mean_norm.tolist()} vs noise {noise_only:.3f}"


def _probs(q, k, h, rows):
    G = q.shape[1] // k.shape[1]
    j = torch.arange(k.shape[0])
    s = (q[rows, h] @ k[:, h // G].T) / math.sqrt(q.shape[2])
    return torch.softmax(s.masked_fill(j[None] > rows[:, None], -math.inf), -1), j


def test_mixed_head_types_have_their_documented_shape(mixed):
    q, k, _, info = mixed
    L, Hq = q.shape[0], q.shape[1]
    G = Hq // k.shape[1]
    assert set(info["types"]) == set(HEAD_TYPES), f"seed 0 should draw every type: {info['types']}"
    rows = torch.arange(L // 2, L, 64)
    for h, kind in enumerate(info["types"]):
        p, j = _probs(q, k, h, rows)
        d = rows[:, None] - j[None]
        if kind == "local":
            W = float(info["width"][h])
            band = (p * ((d >= 0) & (d <= W))).sum(-1).mean()
            assert band > 0.65, f"local head {h} (W {W:.0f}): only {band:.2f} of the mass within W of the diagonal"
        elif kind == "sink":
            sink = p[:, : info["n_sink"][h // G]].sum(-1).mean()
            assert sink > 0.6, f"sink head {h}: {sink:.2f} of the mass on the sink keys"
        elif kind == "noise":
            top = p.sort(-1, descending=True).values.cumsum(-1)
            frac = (((top < 0.9).sum(-1) + 1) / (rows + 1)).float().mean()
            assert frac > 0.5, f"noise head {h}: 90% of the mass in only {frac:.2f} of the keys"
        elif kind == "retrieval":
            events = info["events"][h // G]
            every_key = torch.cat([e[0] for e in events])
            for r, (keys, start, end) in enumerate(events):
                inside, before = rows[(rows >= start) & (rows < end)], rows[rows < start]
                if not len(inside):
                    continue
                # events whose ranges overlap share the mass: the event keys together hold most of it
                pin, _ = _probs(q, k, h, inside)
                held = pin[:, every_key].sum(-1).min()
                assert held > 0.5, f"retrieval head {h}: event keys hold only {held:.2f} inside event {r}'s range"
                if len(before):
                    pout, _ = _probs(q, k, h, before)
                    ratio = pin[:, keys].mean() / pout[:, keys].mean()
                    assert ratio > 10, f"retrieval head {h}: event {r} keys only {ratio:.1f}x stronger in range"
        elif kind == "slash":
            near = torch.zeros_like(p, dtype=torch.bool)
            for off in info["offsets"][h]:
                near |= (d - off).abs() <= 8
            share = (p * near).sum(-1).mean()
            uniform = near.sum(-1).float().div(rows + 1).mean()
            assert share > 5 * uniform, f"slash head {h}: {share:.3f} of the mass near its diagonals " \
                                        f"(uniform: {uniform:.3f})"
