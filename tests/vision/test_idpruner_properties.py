"""Property tests (hypothesis) for IDPruner's entry points on degenerate inputs: each call returns a valid
selection (exactly ``keep`` sorted distinct indices in [0, N)) or raises ValueError, which the serving hooks turn
into a per-image fallback (sgl_slim/integration/containment.py). Finite inputs, however degenerate (zeros,
identical tokens, one huge value, N = 1), always give a valid selection."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from degenerate import token_matrix

from sgl_slim.vision import idpruner_select, idpruner_select_ref

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("normal", "zeros", "identical", "one_huge", "max_float", "tiny", "nan", "inf", "neg_inf")


@st.composite
def cases(draw):
    n = draw(st.integers(1, 24))
    d = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    x = token_matrix(draw, st, kind, n, d, gen)
    keep = draw(st.sampled_from([1, n, max(1, n // 2), draw(st.integers(1, n))]))
    lam = draw(st.sampled_from([0.0, 0.5, 1.0, draw(st.floats(0.0, 1.0))]))
    importance = None
    if draw(st.booleans()):
        imp_kind = draw(st.sampled_from(("normal", "constant", "nan", "huge")))
        importance = {"normal": torch.randn(n, generator=gen), "constant": torch.full((n,), 3.0),
                      "nan": torch.full((n,), float("nan")), "huge": torch.full((n,), 3e38)}[imp_kind]
    return x, importance, keep, lam


def _finite(x, importance):
    return bool(torch.isfinite(x).all()) and (importance is None or bool(torch.isfinite(importance).all()))


def _assert_valid(sel, n, keep):
    assert sel.dtype == torch.long and sel.shape == (keep,), (sel.dtype, sel.shape, keep)
    assert int(sel.min()) >= 0 and int(sel.max()) < n
    assert bool((sel[1:] > sel[:-1]).all()), f"not sorted and distinct: {sel.tolist()}"


@SETTINGS
@given(cases())
def test_select_valid_or_value_error(case):
    x, importance, keep, lam = case
    try:
        sel = idpruner_select(x, importance, keep, mmr_lambda=lam, backend="torch")
    except ValueError as exc:
        assert not _finite(x, importance), f"finite input refused: {exc}"
        assert "NaN or inf" in str(exc)
        return
    assert _finite(x, importance), "non-finite input must raise ValueError, not select"
    _assert_valid(sel, x.shape[0], keep)


@SETTINGS
@given(cases())
def test_reference_agrees_on_validity(case):
    x, importance, keep, lam = case
    try:
        sel = idpruner_select_ref(x, importance, keep, mmr_lambda=lam)
    except ValueError:
        assert not _finite(x, importance)
        return
    _assert_valid(sel, x.shape[0], keep)


@pytest.mark.parametrize("shape,keep", [((0, 4), 1), ((3, 0), 1), ((3, 4), 0), ((3, 4), 4), ((3,), 1)])
def test_empty_and_out_of_range_raise_value_error(shape, keep):
    with pytest.raises(ValueError, match="idpruner"):
        idpruner_select(torch.zeros(shape), None, keep, backend="torch")
