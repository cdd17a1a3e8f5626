"""Samp algorithm: fast path vs plain-loop references, count / order / distinctness rules, bad arguments."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sgl_slim.audio import SampAttention, attention_stats, samp_compress
from sgl_slim.audio.samp import (dpp_select, dpp_select_ref, merge_clusters, merge_clusters_ref,
                                 samp_compress_ref)
from sgl_slim.config import SampConfig


def _clip(n, d=24, *, seed=0, step=0.35):
    """Audio-like tokens: a random walk (neighbours similar, far tokens not) plus attention statistics."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x = torch.cumsum(x * step, dim=0) + torch.randn(1, d, generator=g) * 2
    probs = torch.softmax(torch.randn(4, n, n, generator=g) * 2, dim=-1)       # [H, N, N]
    return x, probs


def _starts_to_clusters(starts, n):
    bounds = starts.tolist() + [n]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(len(bounds) - 1)]


@pytest.mark.parametrize("n", [1, 2, 7, 33, 64])
@pytest.mark.parametrize("threshold", [-1.0, 0.3, 0.8, 0.95, 1.01])
@pytest.mark.parametrize("keep_ratio", [0.4, 0.6, 1.0])
def test_merge_matches_reference(n, threshold, keep_ratio):
    x, _ = _clip(n, seed=n)
    keep = SampConfig(keep_ratio=keep_ratio).keep_count(n)
    ref = merge_clusters_ref(x, keep=keep, merge_threshold=threshold)
    fast = _starts_to_clusters(merge_clusters(x, keep=keep, merge_threshold=threshold), n)
    assert fast == ref
    assert len(ref) >= keep, "merging must never leave fewer clusters than keep"
    if threshold > 1 or keep == n:
        assert len(ref) == n


def test_merge_actually_merges_and_stops_at_keep():
    x, _ = _clip(40, seed=3, step=0.05)                                       # very smooth: all similar
    clusters = merge_clusters_ref(x, keep=10, merge_threshold=0.5)
    assert len(clusters) == 10, "smooth clip at a low threshold merges down to exactly keep"
    assert [i for c in clusters for i in c] == list(range(40))
    assert len(merge_clusters_ref(x, keep=1, merge_threshold=0.5)) < 40


@pytest.mark.parametrize("c,keep,seed", [(5, 1, 0), (12, 5, 1), (40, 17, 2), (40, 39, 3), (97, 31, 4)])
def test_dpp_matches_reference(c, keep, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(c, 128, generator=g), dim=-1)
    rel = torch.rand(c, generator=g) + 0.1
    kernel = rel[:, None] * (feats @ feats.T) * rel[None, :]
    fast = dpp_select(kernel, keep).tolist()
    assert fast == dpp_select_ref(kernel, keep)
    assert len(fast) == keep and len(set(fast)) == keep and fast == sorted(fast)


def test_dpp_prefers_diverse_items():
    # items 0 and 1 are the same direction; 2 is orthogonal: a diverse pair of 2 includes item 2
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    rel = torch.tensor([1.0, 0.99, 0.5])
    kernel = rel[:, None] * (feats @ feats.T) * rel[None, :]
    assert dpp_select(kernel, 2).tolist() == [0, 2]
    assert dpp_select_ref(kernel, 2) == [0, 2]


def test_dpp_degenerate_duplicates_still_exact_count():
    feats = torch.tensor([[1.0, 0.0]] * 6)                                    # rank 1: one diverse pick only
    rel = torch.tensor([0.2, 0.9, 0.5, 0.9, 0.1, 0.3])
    kernel = rel[:, None] * (feats @ feats.T) * rel[None, :]
    fast = dpp_select(kernel, 4).tolist()
    assert fast == dpp_select_ref(kernel, 4) == [1, 2, 3, 5]                 # then largest diagonal, earlier first


@pytest.mark.parametrize("n", [1, 3, 16, 41])
@pytest.mark.parametrize("threshold", [0.2, 0.9, 2.0])
@pytest.mark.parametrize("keep_ratio", [0.05, 0.4, 0.6, 1.0])
def test_samp_compress_matches_reference(n, threshold, keep_ratio):
    x, probs = _clip(n, seed=100 + n)
    keep = SampConfig(keep_ratio=keep_ratio).keep_count(n)
    out, groups = samp_compress(x, probs, keep=keep, merge_threshold=threshold)
    out_ref, groups_ref = samp_compress_ref(x, probs, keep=keep, merge_threshold=threshold)
    assert groups == groups_ref
    # both sum the same float64 terms in different orders; then one rounding to float32
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    assert out.shape == (keep, x.shape[1]) and out.dtype == x.dtype
    flat = [i for g in groups for i in g]
    assert flat == sorted(flat) and len(set(flat)) == len(flat), "kept groups are disjoint, in time order"
    for g in groups:
        assert g == list(range(g[0], g[-1] + 1)), "a cluster is a contiguous run of time"


def test_merged_token_is_attention_weighted_mean():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    stats = SampAttention(merge_weight=torch.tensor([3.0, 1.0, 1.0]), relevance=torch.ones(3))
    out, groups = samp_compress(x, stats, keep=2, merge_threshold=0.9)
    assert groups == [[0, 1], [2]]
    torch.testing.assert_close(out[0], (3 * x[0] + x[1]) / 4)
    torch.testing.assert_close(out[1], x[2])


def test_attention_stats_definition():
    probs = torch.softmax(torch.randn(3, 5, 5), dim=-1)
    stats = attention_stats(probs)
    for i in range(5):
        col_of_head_max = [max(float(probs[h, q, i]) for h in range(3)) for q in range(5)]
        assert abs(float(stats.merge_weight[i]) - sum(col_of_head_max) / 5) < 1e-6
        assert abs(float(stats.relevance[i]) - float(probs[:, i, i].mean())) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_all_without_merging_is_identity(dtype):
    x, probs = _clip(21, seed=5)
    x = x.to(dtype)
    out, groups = samp_compress(x, probs, keep=21, merge_threshold=1.5)
    assert torch.equal(out, x) and groups == [[i] for i in range(21)]
    out, _ = samp_compress(x, probs, keep=21, merge_threshold=-1.0)           # keep == N forbids merging
    assert torch.equal(out, x)


def test_threshold_above_one_merges_nothing_even_for_duplicates():
    x = torch.ones(8, 4)
    probs = torch.full((2, 8, 8), 1 / 8)
    _, groups = samp_compress(x, probs, keep=3, merge_threshold=1.0000001)
    assert all(len(g) == 1 for g in groups)
    _, groups = samp_compress(x, probs, keep=3, merge_threshold=1.0 - 1e-6)  # duplicates merge below 1
    assert sum(len(g) for g in groups) == 8 and len(groups) == 3


def test_bad_arguments_name_the_problem():
    x, probs = _clip(6)
    with pytest.raises(ValueError, match="keep must be in"):
        samp_compress(x, probs, keep=0, merge_threshold=0.9)
    with pytest.raises(ValueError, match="keep must be in"):
        samp_compress(x, probs, keep=7, merge_threshold=0.9)
    with pytest.raises(ValueError, match="keep must be an int"):
        samp_compress(x, probs, keep=2.5, merge_threshold=0.9)
    with pytest.raises(ValueError, match=r"tokens must be a \[N, D\]"):
        samp_compress(x[0], probs, keep=1, merge_threshold=0.9)
    with pytest.raises(ValueError, match="tokens is empty"):
        samp_compress(x[:0], probs[:, :0, :0], keep=1, merge_threshold=0.9)
    with pytest.raises(ValueError, match=r"attn must be \[H, 6, 6\]"):
        samp_compress(x, probs[:, :5, :5], keep=2, merge_threshold=0.9)
    with pytest.raises(ValueError, match="merge_threshold must be a number"):
        samp_compress(x, probs, keep=2, merge_threshold=float("nan"))
    with pytest.raises(ValueError, match="non-negative"):
        samp_compress(x, SampAttention(-torch.ones(6), torch.ones(6)), keep=2, merge_threshold=0.9)
    with pytest.raises(ValueError, match="floating point"):
        samp_compress(x.long(), probs, keep=2, merge_threshold=0.9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n, threshold", [(750, 2.0), (750, 0.5), (250, 0.9)])
def test_samp_compress_on_cuda_keeps_the_cpu_tokens(n, threshold):
    """A clip compressed on the GPU keeps the same groups as on the CPU."""
    x, probs = _clip(n, seed=7)
    keep = SampConfig(keep_ratio=0.6).keep_count(n)
    out, groups = samp_compress(x, probs, keep=keep, merge_threshold=threshold)
    out_gpu, groups_gpu = samp_compress(x.cuda(), probs.cuda(), keep=keep, merge_threshold=threshold)
    assert groups_gpu == groups
    # the same float64 sums in a possibly different order on each device, then one rounding to float32
    torch.testing.assert_close(out_gpu.cpu(), out, rtol=1e-6, atol=1e-6)


_INTERPRET_DPP_SCRIPT = textwrap.dedent("""
    import torch
    from sgl_slim.audio.dpp_triton import dpp_picks_triton
    from sgl_slim.audio.samp import DEGENERATE_GAIN, _fill_degenerate, dpp_select, dpp_select_ref
    def kernel_of(feats, rel):
        f = torch.nn.functional.normalize(feats, dim=-1)
        return (rel[:, None] * (f @ f.T) * rel[None, :]).double()
    for c, keep, seed in [(5, 1, 0), (12, 5, 1), (40, 17, 2), (40, 39, 3), (97, 31, 4), (130, 60, 5)]:
        g = torch.Generator().manual_seed(seed)
        k = kernel_of(torch.randn(c, 64, generator=g), torch.rand(c, generator=g) + 0.1)
        floor = DEGENERATE_GAIN * float(k.diagonal().max())
        picks = dpp_picks_triton(k, keep, floor).tolist()
        assert len(picks) == keep, (c, keep, picks)
        got = _fill_degenerate(k.diagonal(), picks, keep).tolist()
        assert got == dpp_select(k, keep).tolist(), (c, keep)
        if c <= 40:
            assert got == dpp_select_ref(k, keep), (c, keep)
    # rank 1 (duplicates): one diverse pick, then the caller fills by largest diagonal, earlier first
    rel = torch.tensor([0.2, 0.9, 0.5, 0.9, 0.1, 0.3])
    k = kernel_of(torch.tensor([[1.0, 0.0]] * 6), rel)
    picks = dpp_picks_triton(k, 4, DEGENERATE_GAIN * float(k.diagonal().max())).tolist()
    assert picks == [1], picks
    assert _fill_degenerate(k.diagonal(), picks, 4).tolist() == [1, 2, 3, 5]
    print("OK")
""")


def test_dpp_triton_matches_host_loop_under_interpreter():
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", _INTERPRET_DPP_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=repo)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("c, keep", [(750, 450), (750, 300), (2000, 900)])
def test_dpp_select_on_cuda_equals_the_host_loop(c, keep):
    g = torch.Generator().manual_seed(c + keep)
    feats = torch.nn.functional.normalize(torch.randn(c, 256, generator=g), dim=-1)
    rel = torch.rand(c, generator=g) + 0.1
    kernel = (rel[:, None] * (feats @ feats.T) * rel[None, :]).double()
    assert torch.equal(dpp_select(kernel.cuda(), keep), dpp_select(kernel, keep))
