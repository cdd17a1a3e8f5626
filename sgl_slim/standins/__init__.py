"""Stand-ins for SGLang's compiled ``sgl_kernel`` ops, for hosts where the compiled library cannot run.

SGLang 0.5.23 calls ``torch.ops.sgl_kernel.*`` ops from a compiled library (the ``sglang-kernel`` wheel). Two
kinds of host lack it: a CPU-only machine (the PyPI wheel is CUDA-only; SGLang's CPU engine wants a CPU build
that is not published) and a GPU host whose torch differs from the one the wheel was built against (the
library fails to load). sgl_slim supplies the ops it needs there in plain torch, each tested against its
definition (``tests/standins/``); docs/STANDINS.md lists every op with the SGLang code that calls it.

- :mod:`.cpu_ops`   serving ops of SGLang's CPU engine (``*_cpu``);
- :mod:`.spec_ops`  the speculative-decoding ops of SGLang's EAGLE worker on the CPU (ports of its Triton kernels);
- :mod:`.gpu_ops`   the CUDA ops SGLang calls on the GPU path (norms, activations, rotary, sampling, ...);
- ``cpu_shim/`` and ``gpu_shim/``: a ``common_ops`` module each, put on the path by the launcher, where
  sgl_kernel's loader looks for its compiled library as a last resort (``import common_ops``);
- :mod:`.gpu`       the launcher's GPU stand-in mode (detection, environment, SGLang flags).

Nothing here imports sglang or sgl_kernel (tests/test_walls.py); the SGLang-side pieces (hooks, draft
backends) are in ``sgl_slim/integration/standins/``.
"""

from __future__ import annotations

import torch

NAMESPACE = "sgl_kernel"
_LIB: torch.library.Library | None = None


def define_ops(ops: dict) -> list[str]:
    """Define ``{name: (schema, fn)}`` under ``torch.ops.sgl_kernel``, skipping names already there
    (idempotent). Returns the names defined by this call. Shared by every stand-in module."""
    global _LIB
    added = []
    for name, (schema, fn) in ops.items():
        if hasattr(torch.ops.sgl_kernel, name):
            continue
        if _LIB is None:
            _LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
        _LIB.define(name + schema)
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        added.append(name)
    return added
