"""The audit study's counts (benchmarks/s2o_audit_study.py) on a small input: the bound never misses a hit and
lets more through with fewer dimensions; with every dimension the bound is the exact audit up to its rounding
allowance; the estimate's found hits are a subset of its flags and of the hits; the fp8 pre-filter at the kernel's margin
misses no hit."""

import torch

from benchmarks.s2o_audit_study import study
from sgl_slim.attention.inputs import make_qkv


def test_audit_study_counts_are_consistent():
    q, k, _ = make_qkv(6144, 4, 1, 64, seed=2, dtype=torch.float32, device="cpu")
    r = study(q, k, 1e-2, dims=[8, 32, 64], sigmas=[0.0, 2.0], fp8_sigmas=(0.5, 4.0))
    assert r["audited"] > 0 and 0 < r["hits"] < r["audited"], r
    assert r["hits"] <= r["bound_64"] <= r["bound_32"] <= r["bound_8"] <= r["audited"], r
    assert r["bound_64"] - r["hits"] <= 0.05 * r["audited"], "all 64 dims: the bound is the exact audit + rounding"
    assert r["hits"] <= min(r["bound_norm"], r["bound_centroid"]) and max(r["bound_norm"], r["bound_centroid"]) <= \
        r["audited"], r
    for d in (8, 32, 64):
        for c in ("0", "2"):
            flagged, found = r[f"approx_{d}_c{c}"], r[f"approx_{d}_c{c}_hits"]
            assert found <= min(flagged, r["hits"]), (d, c, r)
        assert r[f"approx_{d}_c2"] >= r[f"approx_{d}_c0"], "a wider margin flags more"
    # the fp8 pre-filter: a wider margin lists more; with the kernel's 4 sigmas it lists every hit
    assert r["fp8_c0.5_hits"] <= r["fp8_c0.5"] <= r["fp8_c4"] <= r["audited"], r
    assert r["fp8_c4_hits"] == r["hits"] and 0 < r["fp8_max_sigmas"] < 4, r
