import math

import torch

from sgl_slim.testbed.dump import BAND, dense_fp32, head_stats, summarize_heads


def _planted(T=1024, D=16):
    """Head 0 looks only at key 0 (sink), head 1 only at its own position (local)."""
    q = torch.zeros(T, 2, D)
    k = torch.zeros(T, 1, D)
    k[0, 0, 0] = 1.0           # the sink key
    k[:, 0, 1] = 1.0           # every key has a 'local' feature ...
    q[:, 0, 0] = 60.0          # head 0: sink
    # head 1: prefers keys near the query: pos feature on a rotating pair (exact diagonal via large scores)
    ang = torch.arange(T).float() * 0.3
    k[:, 0, 2], k[:, 0, 3] = ang.cos(), ang.sin()
    q[:, 1, 2], q[:, 1, 3] = 80 * ang.cos(), 80 * ang.sin()
    return q, k


def test_head_stats_find_planted_sink_and_local_heads():
    q, k = _planted()
    s = head_stats(q, k, n_rows=16, sm_scale=1.0)
    assert s[0]["sink"] > 0.99 and s[0]["tail"] < 0.01
    assert s[1]["sink"] < 0.01
    for r in s:
        total = r["sink"] + r["local"] + r["scattered"] + r["tail"]
        assert math.isclose(total, 1.0, abs_tol=1e-4)
    # head 1's mass sits on keys whose phase matches (period 2*pi/0.3 ~ 21 tokens): the band holds the
    # nearest of them, the rest is scattered/tail but the band is not empty
    assert s[1]["local"] > 0.0 and BAND == 128


def test_dense_fp32_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(300, 4, 8), torch.randn(300, 2, 8), torch.randn(300, 2, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True).transpose(0, 1)
    assert torch.allclose(dense_fp32(q, k, v, 1 / math.sqrt(8)), ref, atol=1e-5)


def test_summary_per_source():
    rows = [{"source": "model", "sink": 0.5, "local": 0.2, "scattered": 0.2, "tail": 0.1},
            {"source": "model", "sink": 0.1, "local": 0.6, "scattered": 0.2, "tail": 0.1},
            {"source": "generator", "sink": 0.9, "local": 0.05, "scattered": 0.05, "tail": 0.0}]
    out = {r["source"]: r for r in summarize_heads(rows)}
    assert out["model"]["heads"] == 2 and math.isclose(out["model"]["sink"]["mean"], 0.3)
    assert out["generator"]["sink"]["max"] == 0.9


def test_oracle_keeping_all_mass_is_dense():
    from sgl_slim.testbed.dump import oracle
    torch.manual_seed(0)
    q, k, v = torch.randn(256, 4, 16), torch.randn(256, 2, 16), torch.randn(256, 2, 16)
    rows = oracle({0: (q, k, v)}, masses=(1.0, 0.5), source="t", segment_size=64, log=lambda r: None)
    full, half = rows
    assert full["density"] == 1.0 and full["rel_l2"] < 1e-5
    assert half["density"] < 1.0 and half["rel_l2"] > full["rel_l2"]
