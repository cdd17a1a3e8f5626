"""IDPruner selection: fast paths vs the plain-loop fp32 reference, contract of the result, errors."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sgl_slim.vision import (
    compute_importance,
    idpruner_order,
    idpruner_order_ref,
    idpruner_select,
    idpruner_select_ref,
    normalize_importance,
)
from sgl_slim.vision.quality import coverage, importance_mass, select_maxmin, select_random, select_topk

REPO = Path(__file__).resolve().parents[2]

# Scores are a few fp32 ops on cosines that the paths sum in different orders (~1e-7 apart); two
# candidates closer than this are a tie in floating point and either pick is right.
TIE_TOL = 1e-5


def assert_same_up_to_ties(features, importance, order_fast, order_ref, lam):
    """Orders must agree; where they first differ, the two candidates must tie in the reference's scores."""
    order_fast = [int(i) for i in order_fast]
    if order_fast == order_ref:
        return
    step = next(t for t, (a, b) in enumerate(zip(order_fast, order_ref)) if a != b)
    unit = features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    imp = normalize_importance(importance if importance is not None else compute_importance(features))
    picked = order_ref[:step]
    if step == 0:
        scores = imp
    else:
        max_sim = (unit @ unit[picked].T).max(dim=1).values
        scores = lam * imp - (1 - lam) * max_sim
    a, b = order_fast[step], order_ref[step]
    assert abs(float(scores[a]) - float(scores[b])) <= TIE_TOL, (
        f"orders differ at step {step}: fast {a} (score {float(scores[a]):.8f}) vs ref {b} "
        f"(score {float(scores[b]):.8f}), not a tie")


CASES = [  # (N, D, keep, lambda)
    (1, 4, 1, 0.5),
    (7, 3, 3, 0.5),
    (97, 16, 24, 0.5),
    (130, 33, 40, 1.0),     # pure importance: top-k
    (130, 33, 40, 0.0),     # pure diversity after the first pick
    (64, 8, 64, 0.3),       # keep everything
    (257, 12, 5, 0.8),
    (300, 64, 75, 0.5),
]


@pytest.mark.parametrize("n,d,keep,lam", CASES)
@pytest.mark.parametrize("with_importance", [True, False])
def test_torch_path_matches_reference(n, d, keep, lam, with_importance):
    gen = torch.Generator().manual_seed(n * 1000 + keep)
    features = torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen)
    importance = torch.randn(n, generator=gen) if with_importance else None
    ref = idpruner_order_ref(features, importance, keep, mmr_lambda=lam)
    fast = idpruner_order(features, importance, keep, mmr_lambda=lam, backend="torch")
    assert_same_up_to_ties(features, importance, fast.tolist(), ref, lam)
    sel = idpruner_select(features, importance, keep, mmr_lambda=lam, backend="torch")
    assert sel.dtype == torch.long and sel.shape == (keep,)
    assert torch.equal(sel, torch.unique(sel)), "not sorted unique"
    assert 0 <= int(sel.min()) and int(sel.max()) < n
    if fast.tolist() == ref:
        assert torch.equal(sel, idpruner_select_ref(features, importance, keep, mmr_lambda=lam))


def test_lambda_one_is_topk_and_first_pick_is_most_important():
    gen = torch.Generator().manual_seed(1)
    features, importance = torch.randn(50, 8, generator=gen), torch.randn(50, generator=gen)
    sel = idpruner_select(features, importance, 10, mmr_lambda=1.0)
    assert torch.equal(sel, select_topk(importance, 10))
    for lam in (0.0, 0.5):
        assert int(idpruner_order(features, importance, 5, mmr_lambda=lam)[0]) == int(torch.argmax(importance))


def test_lambda_zero_spreads_over_clusters():
    # 4 tight clusters of 25 near-identical tokens: pure diversity must take one per cluster first.
    gen = torch.Generator().manual_seed(2)
    centers = torch.eye(4, 16) * 10
    features = centers.repeat_interleave(25, dim=0) + 0.01 * torch.randn(100, 16, generator=gen)
    sel = idpruner_select(features, torch.rand(100, generator=gen), 4, mmr_lambda=0.0)
    assert sorted(int(i) // 25 for i in sel) == [0, 1, 2, 3], sel
    top = idpruner_select(features, torch.arange(100.0), 4, mmr_lambda=1.0)
    assert top.tolist() == [96, 97, 98, 99]


def test_exact_ties_go_to_lower_index():
    features = torch.ones(10, 4)                       # all identical: every score ties
    assert idpruner_order(features, torch.zeros(10), 4).tolist() == [0, 1, 2, 3]
    assert idpruner_order_ref(features, torch.zeros(10), 4) == [0, 1, 2, 3]
    features = torch.eye(6)                            # orthogonal: ties in max-sim, importance decides
    imp = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.5, 0.0])
    assert idpruner_order(features, imp, 6).tolist() == [1, 2, 3, 4, 0, 5]
    assert idpruner_order_ref(features, imp, 6) == [1, 2, 3, 4, 0, 5]


def test_constant_importance_and_zero_rows_are_handled():
    features = torch.randn(20, 5, generator=torch.Generator().manual_seed(3))
    features[3] = 0.0                                  # zero-norm token: cosine 0 to everyone
    sel = idpruner_select(features, torch.full((20,), 2.0), 6)
    ref = idpruner_select_ref(features, torch.full((20,), 2.0), 6)
    assert torch.equal(sel, ref)


def test_default_importance_is_used_when_none():
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(40, 6, generator=gen)
    explicit = idpruner_select(features, compute_importance(features), 10)
    assert torch.equal(idpruner_select(features, None, 10), explicit)


def test_half_precision_inputs():
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(120, 32, generator=gen).to(torch.bfloat16)
    importance = torch.rand(120, generator=gen)
    ref = idpruner_order_ref(features, importance, 30)
    fast = idpruner_order(features, importance, 30, backend="torch")
    assert_same_up_to_ties(features, importance, fast.tolist(), ref, 0.5)


@pytest.mark.parametrize("bad_keep", [0, -1, 11, 2.5, True, None])
def test_bad_keep_raises(bad_keep):
    with pytest.raises(ValueError, match="keep"):
        idpruner_select(torch.randn(10, 4), None, bad_keep)


def test_bad_inputs_raise_with_a_clear_message():
    with pytest.raises(ValueError, match="2-D"):
        idpruner_select(torch.randn(10), None, 2)
    with pytest.raises(ValueError, match="non-empty"):
        idpruner_select(torch.randn(0, 4), None, 1)
    with pytest.raises(ValueError, match="importance must have shape"):
        idpruner_select(torch.randn(10, 4), torch.rand(9), 2)
    with pytest.raises(ValueError, match="mmr_lambda"):
        idpruner_select(torch.randn(10, 4), None, 2, mmr_lambda=1.5)
    with pytest.raises(ValueError, match="floating point"):
        idpruner_select(torch.ones(10, 4, dtype=torch.long), None, 2)
    nan = torch.randn(10, 4)
    nan[2, 1] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        idpruner_select(nan, None, 2)
    with pytest.raises(ValueError, match="importance contains NaN"):
        idpruner_select(torch.randn(10, 4), torch.full((10,), float("inf")), 2)
    with pytest.raises(ValueError, match="backend"):
        idpruner_select(torch.randn(10, 4), None, 2, backend="cuda")


def test_quality_proxy_orders_the_methods_as_expected():
    # Clustered tokens: MMR covers better than top-k importance keeps the most mass, MMR sits between.
    gen = torch.Generator().manual_seed(6)
    centers = torch.randn(12, 32, generator=gen)
    features = centers[torch.randint(0, 12, (400,), generator=gen)] + 0.3 * torch.randn(400, 32, generator=gen)
    importance = torch.rand(400, generator=gen)
    keep = 40
    mmr = idpruner_select(features, importance, keep)
    topk, rand, maxmin = select_topk(importance, keep), select_random(400, keep), select_maxmin(features, keep)
    assert coverage(features, mmr) > coverage(features, topk)
    assert importance_mass(importance, mmr) > importance_mass(importance, rand)
    assert importance_mass(importance, topk) >= importance_mass(importance, mmr)
    assert coverage(features, select_topk(importance, 400)) == pytest.approx(1.0, abs=1e-5)
    # max-min optimises the worst-covered token (it picks outliers), not the mean
    assert coverage(features, maxmin, reduce="min") > coverage(features, rand, reduce="min")


_INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from sgl_slim.vision.idpruner import cosine_gram, idpruner_order_ref, normalize_importance
    from sgl_slim.vision.idpruner_triton import mmr_order_triton
    for n, d, keep, lam in [(1, 4, 1, 0.5), (37, 8, 10, 0.5), (97, 16, 30, 0.0), (130, 8, 40, 1.0),
                            (5000, 4, 6, 0.5)]:          # 5000 > one 4096 block: cross-block argmax
        gen = torch.Generator().manual_seed(n)
        f, imp = torch.randn(n, d, generator=gen), torch.randn(n, generator=gen)
        got = mmr_order_triton(cosine_gram(f), normalize_importance(imp), keep, lam).tolist()
        want = idpruner_order_ref(f, imp, keep, mmr_lambda=lam)
        assert got == want, (n, keep, lam, got, want)
    # exact ties across blocks go to the lower index
    f = torch.ones(5000, 4)
    assert mmr_order_triton(cosine_gram(f), torch.zeros(5000), 3, 0.5).tolist() == [0, 1, 2]
    print("OK")
""")


def test_triton_kernel_matches_reference_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


_INTERPRET_FUSED_SCRIPT = textwrap.dedent("""
    import pytest, torch
    from sgl_slim.vision import idpruner_order, idpruner_order_ref, idpruner_select
    from sgl_slim.vision import idpruner_triton as it
    cases = [(37, 8, 10, 0.5, True), (97, 16, 30, 0.0, True), (130, 8, 40, 1.0, False), (200, 24, 50, 0.3, False)]
    for packed in (True, False):                     # both argmax reductions
        it.FUSED_LAUNCH["packed"] = packed
        for n, d, keep, lam, with_imp in cases[: (4 if packed else 2)]:
            gen = torch.Generator().manual_seed(n)
            f = torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen)
            imp = torch.randn(n, generator=gen) if with_imp else None
            want = idpruner_order_ref(f, imp, keep, mmr_lambda=lam)
            assert idpruner_order(f, imp, keep, mmr_lambda=lam, backend="triton").tolist() == want, (n, packed)
            assert idpruner_select(f, imp, keep, mmr_lambda=lam, backend="triton").tolist() == sorted(want)
    it.FUSED_LAUNCH["packed"] = True
    # strided rows (a column slice, as the Qwen3-VL hook passes), a zero row, constant importance
    wide = torch.randn(60, 20, generator=torch.Generator().manual_seed(9))
    wide[5] = 0.0
    f = wide[:, :12]
    assert idpruner_order(f, torch.full((60,), 2.0), 15, backend="triton").tolist() == \
        idpruner_order_ref(f, torch.full((60,), 2.0), 15)
    assert idpruner_order(f, None, 15, backend="triton").tolist() == idpruner_order_ref(f, None, 15)
    # exact ties go to the lower index; -0.0 and +0.0 scores tie
    assert idpruner_order(torch.ones(50, 4), torch.zeros(50), 4, backend="triton").tolist() == [0, 1, 2, 3]
    imp = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.5, 0.0])
    assert idpruner_order(torch.eye(6), imp, 6, backend="triton").tolist() == [1, 2, 3, 4, 0, 5]
    # NaN / inf found on the device, reported by name
    bad = torch.randn(40, 6)
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        idpruner_select(bad, None, 5, backend="triton")
    bad[7, 2] = float("-inf")
    with pytest.raises(ValueError, match="features contains NaN"):
        idpruner_select(bad, torch.rand(40), 5, backend="triton")
    imp = torch.rand(40)
    imp[3] = float("inf")
    with pytest.raises(ValueError, match="importance contains NaN"):
        idpruner_select(torch.randn(40, 6), imp, 5, backend="triton")
    print("OK")
""")


def test_fused_triton_path_matches_reference_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _INTERPRET_FUSED_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_path_on_gpu_equals_old_kernel_and_raises_on_nan():
    from sgl_slim.vision.idpruner import cosine_gram
    from sgl_slim.vision.idpruner_triton import mmr_order_triton

    gen = torch.Generator().manual_seed(7)
    features = torch.randn(4096, 512, generator=gen).to(torch.bfloat16).cuda()
    importance = torch.rand(4096, generator=gen).cuda()
    for imp in (importance, None):
        old = mmr_order_triton(cosine_gram(features), normalize_importance(
            imp if imp is not None else compute_importance(features)), 1024, 0.5)
        new = idpruner_order(features, imp, 1024, backend="triton")
        # the norms are summed in another order than torch's: equal up to floating-point ties
        assert_same_up_to_ties(features.cpu(), None if imp is None else imp.cpu(), new.tolist(), old.tolist(), 0.5)
        assert torch.equal(idpruner_select(features, imp, 1024), torch.sort(new).values)
    bad = features.clone()
    bad[100, 3] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        idpruner_select(bad, None, 10)
    importance[5] = float("inf")
    with pytest.raises(ValueError, match="importance contains NaN"):
        idpruner_select(features, importance, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,keep", [(1024, 256), (4096, 1024)])
def test_triton_matches_reference_on_gpu(n, keep):
    gen = torch.Generator().manual_seed(n)
    features = torch.randn(n, 256, generator=gen).to(torch.bfloat16)
    importance = torch.rand(n, generator=gen)
    fast = idpruner_order(features.cuda(), importance.cuda(), keep, backend="triton").cpu()
    torch_path = idpruner_order(features, importance, keep, backend="torch")
    assert_same_up_to_ties(features, importance, fast.tolist(), torch_path.tolist(), 0.5)


def test_trained_scorer_roundtrip_and_errors(tmp_path):
    from sgl_slim.vision.scorer import ImportanceScorer, load_scorer, save_scorer

    torch.manual_seed(0)
    scorer = ImportanceScorer(16, 8)
    save_scorer(scorer, tmp_path / "mlp")
    loaded = load_scorer(tmp_path / "mlp")
    feats = torch.randn(30, 16)
    assert torch.allclose(loaded(feats), scorer(feats))
    want = idpruner_select(feats, scorer(feats), 7)
    assert torch.equal(idpruner_select(feats, loaded(feats), 7), want)
    with pytest.raises(ValueError, match=r"expects features \[N, 16\]"):
        loaded(torch.randn(3, 15))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_scorer(tmp_path / "missing")
    (tmp_path / "mlp" / "config.json").write_text('{"type": "other"}')
    with pytest.raises(ValueError, match="idpruner_scorer"):
        load_scorer(tmp_path / "mlp")
