"""GPU stand-in mode, SGLang side: an SGLang plugin (entry point ``sgl_slim_gpu_standins``) loaded in every
SGLang process, doing nothing unless the launcher turned the mode on (``sgl_slim.standins.gpu``).

SGLang 0.5.23's ``DualGemm._select_mode`` (layers/dual_gemm.py, built by every Llama/Qwen MLP) imports the CuTe
DSL dual GEMM on any CUDA device, which imports ``cutlass`` (nvidia-cutlass-dsl) unconditionally; without that
package model loading dies. AROUND hook: when that import fails for want of ``cutlass`` (or the CUDA Python
bindings it needs), the MLP gets no dual-GEMM mode (``None``, SGLang's own answer off CUDA) and runs its
separate GEMMs. The scheduler builds the model, so the hook must be there: the plugin entry point is what
SGLang loads in each process.

SGLang's EAGLE worker (speculative/eagle_worker_v2.py, ``EagleDraftWorker._capture_cuda_graphs``) imports
``layers/attention/flashmla_backend.py`` on any CUDA device only to list its class among the backends whose
draft-extend step can be graphed; that module imports ``flash_mla`` (the sgl-flash-mla wheel, compiled)
unconditionally. Where that import fails the module is registered here as a placeholder whose ``FlashMLABackend``
refuses to be built, naming the package: the isinstance check it serves is then False, as it is for every
backend but FlashMLA, and nothing else of FlashMLA can run without the package anyway.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types

from sgl_slim.standins.gpu import standins_enabled

logger = logging.getLogger("sgl_slim.standins")

_SELECT_MODE = "sglang.srt.layers.dual_gemm.DualGemm._select_mode"
_FLASHMLA_BACKEND = "sglang.srt.layers.attention.flashmla_backend"
# (the module itself cannot be resolved without flash_mla: its importer is listed)
HOOKED_SYMBOLS: list[str] = [_SELECT_MODE,
                             "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker._capture_cuda_graphs"]
_MISSING_MODULES = ("cutlass", "cuda")

_state = {"registered": False}


def register() -> None:
    """The plugin entry point, in stand-in mode only (idempotent): the dual-GEMM hook and, where the FlashMLA
    backend module cannot be imported, its placeholder."""
    if _state["registered"] or not standins_enabled():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    HookRegistry.register(_SELECT_MODE, select_mode_without_cutlass, HookType.AROUND)
    try:
        importlib.import_module(_FLASHMLA_BACKEND)
    except (ImportError, OSError) as exc:      # no flash_mla, or its compiled library does not load
        sys.modules[_FLASHMLA_BACKEND] = flashmla_placeholder(f"{type(exc).__name__}: {exc}")
    _state["registered"] = True


def flashmla_placeholder(reason: str) -> types.ModuleType:
    """The stand-in for ``flashmla_backend`` where ``flash_mla`` cannot be imported (module doc)."""
    module = types.ModuleType(_FLASHMLA_BACKEND)

    class FlashMLABackend:
        def __init__(self, *args, **kwargs):
            raise ImportError(f"the FlashMLA attention backend needs a working flash_mla package (sgl-flash-mla), "
                              f"which this host lacks ({reason}): choose another --attention-backend",
                              name="flash_mla")

    FlashMLABackend.__module__ = _FLASHMLA_BACKEND
    module.FlashMLABackend = FlashMLABackend
    return module


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
