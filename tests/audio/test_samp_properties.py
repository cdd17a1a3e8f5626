"""Property tests (hypothesis) for Samp's entry points on degenerate inputs: ``samp_compress`` (and its
reference) returns exactly ``keep`` finite tokens with index groups that are contiguous, disjoint and in time
order, or raises ValueError, which the serving hook turns into a per-clip fallback
(sgl_slim/integration/containment.py). Finite tokens with valid statistics always compress."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from degenerate import token_matrix

from sgl_slim.audio import SampAttention, samp_compress
from sgl_slim.audio.samp import samp_compress_ref

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKEN_KINDS = ("normal", "zeros", "identical", "one_huge", "max_float", "tiny", "nan", "inf")
STAT_KINDS = ("uniform", "random", "zeros", "one_huge", "nan", "negative")


@st.composite
def cases(draw):
    n = draw(st.integers(1, 20))
    d = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    kind = draw(st.sampled_from(TOKEN_KINDS))
    x = token_matrix(draw, st, kind, n, d, gen)

    def stat():
        k = draw(st.sampled_from(STAT_KINDS))
        v = {"uniform": torch.full((n,), 1.0 / n), "random": torch.rand(n, generator=gen),
             "zeros": torch.zeros(n), "one_huge": torch.rand(n, generator=gen), "nan": torch.rand(n, generator=gen),
             "negative": torch.rand(n, generator=gen)}[k]
        i = draw(st.integers(0, n - 1))
        if k == "one_huge":
            v[i] = 1e30
        elif k == "nan":
            v[i] = float("nan")
        elif k == "negative":
            v[i] = -0.5
        return v

    stats = SampAttention(merge_weight=stat(), relevance=stat())
    keep = draw(st.sampled_from([1, n, max(1, n // 2), draw(st.integers(1, n))]))
    threshold = draw(st.sampled_from([-1.0, 0.0, 0.5, 0.9, 1.0, 1.5]))
    return x, stats, keep, threshold


def _valid_stats(stats):
    return all(bool(torch.isfinite(v).all()) and bool((v >= 0).all()) for v in (stats.merge_weight, stats.relevance))


def _check(result, x, keep):
    out, groups = result
    assert out.shape == (keep, x.shape[1]) and out.dtype == x.dtype
    assert bool(torch.isfinite(out).all()), "finite tokens gave non-finite output"
    assert len(groups) == keep
    flat = [i for g in groups for i in g]
    assert flat == sorted(set(flat)), f"groups overlap or are out of time order: {groups}"
    assert all(g == list(range(g[0], g[-1] + 1)) for g in groups), f"a group is not contiguous: {groups}"
    assert 0 <= flat[0] and flat[-1] < x.shape[0]


@SETTINGS
@given(cases())
def test_compress_valid_or_value_error(case):
    x, stats, keep, threshold = case
    try:
        result = samp_compress(x, stats, keep=keep, merge_threshold=threshold)
    except ValueError as exc:
        assert not (bool(torch.isfinite(x).all()) and _valid_stats(stats)), f"valid input refused: {exc}"
        return
    assert bool(torch.isfinite(x).all()) and _valid_stats(stats), "invalid input must raise ValueError"
    _check(result, x, keep)


@SETTINGS
@given(cases())
def test_reference_valid_or_value_error(case):
    x, stats, keep, threshold = case
    try:
        result = samp_compress_ref(x, stats, keep=keep, merge_threshold=threshold)
    except ValueError:
        assert not (bool(torch.isfinite(x).all()) and _valid_stats(stats))
        return
    _check(result, x, keep)


@pytest.mark.parametrize("shape,keep", [((0, 4), 1), ((3, 4), 0), ((3, 4), 4), ((3,), 1)])
def test_empty_and_out_of_range_raise_value_error(shape, keep):
    n = shape[0]
    stats = SampAttention(merge_weight=torch.ones(n), relevance=torch.ones(n))
    with pytest.raises(ValueError):
        samp_compress(torch.zeros(shape), stats, keep=keep, merge_threshold=0.9)
