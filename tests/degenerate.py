"""Degenerate token matrices for the property tests (hypothesis): one shared definition of each kind."""

import torch

SPECIAL = {"one_huge": 1e30, "max_float": torch.finfo(torch.float32).max, "nan": float("nan"),
           "inf": float("inf"), "neg_inf": float("-inf")}


def token_matrix(draw, st, kind: str, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """[n, d] fp32 tokens of ``kind``: normal, zeros, identical (every row the same), tiny (1e-30 scale), or one
    entry set to a SPECIAL value (its position drawn with hypothesis' ``draw``)."""
    x = torch.randn(n, d, generator=gen)
    if kind == "zeros":
        x = torch.zeros(n, d)
    elif kind == "identical":
        x = x[:1].expand(n, d).clone()
    elif kind == "tiny":
        x = x * 1e-30
    elif kind in SPECIAL:
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = SPECIAL[kind]
    return x
