"""Vision-token pruning (IDPruner). Plain torch (+ Triton, imported lazily); never imports sglang."""

from .idpruner import (
    idpruner_order,
    idpruner_order_ref,
    idpruner_select,
    idpruner_select_ref,
    normalize_importance,
)
from .importance import DEFAULT_IMPORTANCE, IMPORTANCE_KINDS, compute_importance

__all__ = [
    "DEFAULT_IMPORTANCE",
    "IMPORTANCE_KINDS",
    "compute_importance",
    "idpruner_order",
    "idpruner_order_ref",
    "idpruner_select",
    "idpruner_select_ref",
    "normalize_importance",
]
