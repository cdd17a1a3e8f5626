"""GPU stand-in mode, SGLang side: an SGLang plugin (entry point ``sgl_slim_gpu_standins``) loaded in every
SGLang process, doing nothing unless the launcher turned the mode on (``sgl_slim.standins.gpu``).

SGLang 0.5.23's ``DualGemm._select_mode`` (layers/dual_gemm.py, built by every Llama/Qwen MLP) imports the CuTe
DSL dual GEMM on any CUDA device, which imports ``cutlass`` (nvidia-cutlass-dsl) unconditionally; without that
package model loading dies. AROUND hook: when that import fails for want of ``cutlass`` (or the CUDA Python
bindings it needs), the MLP gets no dual-GEMM mode (``None``, SGLang's own answer off CUDA) and runs its
separate GEMMs. The scheduler builds the model, so the hook must be there: the plugin entry point is what
SGLang loads in each process.
"""

from __future__ import annotations

import logging

from sgl_slim.standins.gpu import standins_enabled

logger = logging.getLogger("sgl_slim.standins")

_SELECT_MODE = "sglang.srt.layers.dual_gemm.DualGemm._select_mode"
HOOKED_SYMBOLS: list[str] = [_SELECT_MODE]
_MISSING_MODULES = ("cutlass", "cuda")

_state = {"registered": False}


def register() -> None:
    """The plugin entry point: register the hook in stand-in mode (idempotent)."""
    if _state["registered"] or not standins_enabled():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    HookRegistry.register(_SELECT_MODE, select_mode_without_cutlass, HookType.AROUND)
    _state["registered"] = True


def select_mode_without_cutlass(original, self, *args, **kwargs):
    try:
        return original(self, *args, **kwargs)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in _MISSING_MODULES:
            raise
        if not _state.get("announced"):
            _state["announced"] = True
            logger.info("sgl_slim stand-ins: no %s package: MLPs run without the CuTe DSL dual GEMM", exc.name)
        return None
