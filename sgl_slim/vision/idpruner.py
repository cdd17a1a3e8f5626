"""IDPruner: choose which vision tokens to keep by Maximal Marginal Relevance (arXiv 2602.13315).

Greedy selection over N tokens with features v [N, D] and importance Imp [N] (min-max normalised to [0, 1]):
    first pick  = argmax_i Imp(i)
    next picks  = argmax_{i unpicked}  lambda * Imp(i) - (1 - lambda) * max_{j picked} cos(v_i, v_j)
A running max-similarity vector makes it O(K * N) after the cosine rows are known. Ties go to the lower
index. The result is the kept indices, sorted ascending, exactly ``keep`` of them.

Three implementations that pick the same tokens (up to exact ties in floating point):
- :func:`idpruner_select_ref`: plain Python loops in fp32, the oracle;
- the torch path (CPU, or any device): one vectorised step per pick, no host sync per step;
- the Triton path (CUDA): one single-program kernel runs the whole greedy loop (``idpruner_triton``). Up to
  ``FUSED_MAX_TOKENS`` tokens it is the fused path: Gram GEMM + a row-statistics kernel + the greedy kernel
  (importance normalisation, first pick, loop and the sorted result in one program), with the NaN/inf input
  check done on the device and read back as one status word after all the work is queued (no host sync
  before the GPU work, so the GPU never idles waiting for the host).
"""

from __future__ import annotations

import math

import torch

from .importance import DEFAULT_IMPORTANCE, compute_importance

# Cosine rows come from an N x N Gram matrix up to this N (fp32: 1 GiB at 16384); above it, one
# matrix-vector product per pick (memory-bound, but no N^2 buffer).
GRAM_MAX_TOKENS = 16384
_NORM_EPS = 1e-12
_RESCALE_ABOVE, _RESCALE_BELOW = 1e15, 1e-15     # |x| beyond these: squares leave fp32's range


def _check_inputs(features: torch.Tensor, importance: torch.Tensor | None, keep: int,
                  mmr_lambda: float) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"idpruner: features must be a 2-D tensor [N, D], got {shape}")
    n, d = features.shape
    if n == 0 or d == 0:
        raise ValueError(f"idpruner: features must be non-empty, got shape {(n, d)}")
    if not features.is_floating_point():
        raise ValueError(f"idpruner: features must be floating point, got {features.dtype}")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"idpruner: keep must be an int, got {type(keep).__name__} {keep!r}")
    if not (1 <= keep <= n):
        raise ValueError(f"idpruner: keep must be in [1, N={n}], got {keep}")
    if not (isinstance(mmr_lambda, (int, float)) and 0.0 <= mmr_lambda <= 1.0):
        raise ValueError(f"idpruner: mmr_lambda must be in [0, 1], got {mmr_lambda!r}")
    if importance is not None:
        if not isinstance(importance, torch.Tensor) or importance.shape != (n,):
            shape = tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
            raise ValueError(f"idpruner: importance must have shape [N]=({n},), got {shape}")
        if importance.device != features.device:
            raise ValueError(f"idpruner: importance is on {importance.device}, features on {features.device}")


def _check_finite(name: str, x: torch.Tensor) -> None:
    # One host sync per call (not per step): NaN would make every comparison false.
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"idpruner: {name} contains NaN or inf")


def _rescaled(features: torch.Tensor) -> torch.Tensor:
    """``features`` divided by its largest magnitude when that is so large (or small) that squared fp32 norms
    would overflow (or underflow): cosines and min-max-normalised norm importance do not change under one
    positive scale, so the selection is the same; ordinary magnitudes pass through untouched (bit for bit)."""
    amax = float(features.detach().abs().max())
    if amax > _RESCALE_ABOVE or 0.0 < amax < _RESCALE_BELOW:
        return (features.double() / amax).float()
    return features


def normalize_importance(importance: torch.Tensor) -> torch.Tensor:
    """Min-max normalise to [0, 1] in fp32; a constant vector becomes all zeros."""
    imp = importance.float()
    lo, hi = imp.min(), imp.max()
    span = hi - lo
    # where() instead of a Python branch: no host sync.
    return torch.where(span > 0, (imp - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(imp))


def _resolve_importance(features: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    if importance is None:
        importance = compute_importance(features, DEFAULT_IMPORTANCE)
    _check_finite("importance", importance)
    return normalize_importance(importance)


# ----------------------------------------------------------------------------------------------------------
# Reference: plain loops, fp32, obviously correct.
# ----------------------------------------------------------------------------------------------------------

def idpruner_order_ref(features: torch.Tensor, importance: torch.Tensor | None, keep: int, *,
                       mmr_lambda: float = 0.5) -> list[int]:
    """The greedy pick order (a list of ``keep`` indices, first pick first); see :func:`idpruner_select_ref`."""
    _check_inputs(features, importance, keep, mmr_lambda)
    _check_finite("features", features)
    features = _rescaled(features)
    imp = _resolve_importance(features, importance).cpu()
    v = features.detach().float().cpu()
    v = v / v.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)      # unit rows: dot product = cosine
    n = v.shape[0]
    lam = torch.tensor(mmr_lambda, dtype=torch.float32)
    one_minus_lam = torch.tensor(1.0 - mmr_lambda, dtype=torch.float32)

    first = 0
    for i in range(1, n):
        if imp[i] > imp[first]:          # strict: ties keep the lower index
            first = i
    order = [first]
    picked = [False] * n
    picked[first] = True
    max_sim = [v[i] @ v[first] for i in range(n)]                  # 0-d fp32 tensors

    for _ in range(keep - 1):
        best, best_score = -1, None
        for i in range(n):
            if picked[i]:
                continue
            score = lam * imp[i] - one_minus_lam * max_sim[i]      # fp32 arithmetic
            if best_score is None or score > best_score:
                best, best_score = i, score
        order.append(best)
        picked[best] = True
        for i in range(n):
            max_sim[i] = torch.maximum(max_sim[i], v[i] @ v[best])
    return order


def idpruner_select_ref(features: torch.Tensor, importance: torch.Tensor | None, keep: int, *,
                        mmr_lambda: float = 0.5) -> torch.Tensor:
    """Readable fp32 reference of :func:`idpruner_select` (slow: Python loops over N per pick)."""
    order = idpruner_order_ref(features, importance, keep, mmr_lambda=mmr_lambda)
    return torch.tensor(sorted(order), dtype=torch.long, device=features.device)


# ----------------------------------------------------------------------------------------------------------
# Fast paths.
# ----------------------------------------------------------------------------------------------------------

def cosine_gram(features: torch.Tensor) -> torch.Tensor:
    """[N, N] fp32 cosine similarities. Low-precision inputs multiply exactly into an fp32 accumulator
    (bf16 x bf16 fits fp32), so the result matches an fp32 computation to rounding of the sums."""
    inv_norm = 1.0 / features.float().norm(dim=1).clamp_min(_NORM_EPS)                # [N]
    if features.dtype in (torch.float16, torch.bfloat16) and features.is_cuda:
        try:
            gram = torch.mm(features, features.T, out_dtype=torch.float32)              # [N, N]
        except TypeError:       # torch without mm(out_dtype=): exact but slower fp32 product
            f32 = features.float()
            gram = f32 @ f32.T
    else:
        f32 = features.float()
        gram = f32 @ f32.T
    return gram.mul_(inv_norm[:, None]).mul_(inv_norm[None, :])


def _order_torch(features: torch.Tensor, imp: torch.Tensor, keep: int, mmr_lambda: float) -> torch.Tensor:
    """Vectorised greedy loop; index tensors stay on the device (no host sync per step)."""
    n = features.shape[0]
    device = features.device
    if n <= GRAM_MAX_TOKENS:
        gram = cosine_gram(features)
        cos_row = lambda idx: gram.index_select(0, idx.view(1))[0]                      # noqa: E731
    else:
        unit = features.float()
        unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        cos_row = lambda idx: unit @ unit.index_select(0, idx.view(1))[0]               # noqa: E731

    order = torch.empty(keep, dtype=torch.long, device=device)
    first = torch.argmax(imp)                        # documented: first maximal index on ties
    order[0] = first
    picked = torch.zeros(n, dtype=torch.bool, device=device)
    picked[first] = True
    max_sim = cos_row(first).clone()                 # [N]
    lam_imp = imp * mmr_lambda                       # fp32 [N]
    one_minus_lam = 1.0 - mmr_lambda
    neg_inf = torch.tensor(-math.inf, device=device)
    for k in range(1, keep):
        score = torch.where(picked, neg_inf, lam_imp - one_minus_lam * max_sim)
        idx = torch.argmax(score)
        order[k] = idx
        picked[idx] = True
        torch.maximum(max_sim, cos_row(idx), out=max_sim)
    return order


def _use_triton(features: torch.Tensor) -> bool:
    if not features.is_cuda:
        return False
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False
    return features.shape[0] <= GRAM_MAX_TOKENS


def _triton_fused(features: torch.Tensor, importance: torch.Tensor | None, keep: int, mmr_lambda: float):
    """(order, kept ascending) through the fused Triton path; raises on NaN/inf input after reading the
    device-side status word (one 4-byte read once everything is queued)."""
    from .idpruner_triton import mmr_select_fused  # noqa: PLC0415 (lazy: triton is optional)
    order, sel, status = mmr_select_fused(features, importance, keep, mmr_lambda, eps=_NORM_EPS)
    bits = int(status.item())
    if bits & 1:
        raise ValueError("idpruner: features contains NaN or inf")
    if bits & 2:
        raise ValueError("idpruner: importance contains NaN or inf")
    return order, sel


def _order_and_sel(features, importance, keep, mmr_lambda, backend):
    """(order, kept ascending or None)."""
    _check_inputs(features, importance, keep, mmr_lambda)
    features = features.detach()
    if backend == "auto":
        backend = "triton" if _use_triton(features) else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"idpruner: backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton":
        from .idpruner_triton import FUSED_MAX_TOKENS  # noqa: PLC0415
        if features.shape[0] <= FUSED_MAX_TOKENS:
            return _triton_fused(features, importance, keep, mmr_lambda)
    _check_finite("features", features)
    features = _rescaled(features)
    imp = _resolve_importance(features, importance)
    if backend == "triton":
        from .idpruner_triton import mmr_order_triton  # noqa: PLC0415 (lazy: triton is optional)
        return mmr_order_triton(cosine_gram(features), imp, keep, mmr_lambda).long(), None
    return _order_torch(features, imp, keep, mmr_lambda), None


def idpruner_order(features: torch.Tensor, importance: torch.Tensor | None, keep: int, *,
                   mmr_lambda: float = 0.5, backend: str = "auto") -> torch.Tensor:
    """Greedy pick order (LongTensor [keep], first pick first) on the features' device.

    backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    """
    return _order_and_sel(features, importance, keep, mmr_lambda, backend)[0]


def idpruner_select(features: torch.Tensor, importance: torch.Tensor | None, keep: int, *,
                    mmr_lambda: float = 0.5, backend: str = "auto") -> torch.Tensor:
    """Indices of the ``keep`` vision tokens IDPruner keeps, sorted ascending (LongTensor [keep]).

    features:   [N, D] vision embeddings at the LLM input (after the patch merger), any float dtype.
    importance: [N] scores (higher = more important; min-max normalised here) or None for the
                training-free default (:data:`sgl_slim.vision.importance.DEFAULT_IMPORTANCE`).
    keep:       1 <= keep <= N.
    mmr_lambda: 1 = pure importance (top-k), 0 = pure diversity after the first pick.
    NaN/inf in features or importance raise ValueError (on CUDA after the work is queued: one status read).
    Degenerate finite inputs (all zeros, identical tokens, N = 1, magnitudes near fp32's limits) give a valid
    selection (the fused CUDA path raises the same ValueError when magnitudes overflow its fp32 norms).
    """
    order, sel = _order_and_sel(features, importance, keep, mmr_lambda, backend)
    return sel if sel is not None else torch.sort(order).values
