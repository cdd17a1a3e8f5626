"""GPU stand-in mode, SGLang side (sgl_slim.integration.standins.gpu): the dual-GEMM guard is registered only in
that mode, turns a missing ``cutlass`` into "no dual GEMM" and nothing else, and its target exists in SGLang."""

import pytest

from sgl_slim.integration.standins import gpu as gpu_glue
from sgl_slim.integration.symbols import resolve
from sgl_slim.standins.gpu import MODE_VAR


@pytest.fixture
def registered(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    calls = []
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, *a, **k: calls.append(a)))
    monkeypatch.setattr(gpu_glue, "_state", {"registered": False})
    return calls


def test_register_does_nothing_outside_the_mode(registered, monkeypatch):
    monkeypatch.delenv(MODE_VAR, raising=False)
    gpu_glue.register()
    assert registered == []


def test_register_in_the_mode_hooks_select_mode_once(registered, monkeypatch):
    monkeypatch.setenv(MODE_VAR, "1")
    gpu_glue.register()
    gpu_glue.register()
    assert len(registered) == 1
    assert registered[0][:2] == (gpu_glue._SELECT_MODE, gpu_glue.select_mode_without_cutlass)


def _raising(exc):
    def original(self, *args):
        raise exc
    return original


def test_guard_turns_only_a_missing_cutlass_into_no_mode():
    assert gpu_glue.select_mode_without_cutlass(lambda self, *a: "UNQUANT", object(), "proj", 4096) == "UNQUANT"
    missing = ModuleNotFoundError("No module named 'cutlass'", name="cutlass")
    assert gpu_glue.select_mode_without_cutlass(_raising(missing), object(), "proj", 4096) is None
    other = ModuleNotFoundError("No module named 'numpy'", name="numpy")
    with pytest.raises(ModuleNotFoundError, match="numpy"):
        gpu_glue.select_mode_without_cutlass(_raising(other), object(), "proj", 4096)


def test_hooked_symbols_exist_in_the_pinned_sglang():
    for dotted in gpu_glue.HOOKED_SYMBOLS:
        assert callable(resolve(dotted)), dotted


def test_flashmla_placeholder_lets_the_eagle_worker_import_it(registered, monkeypatch):
    import sys
    monkeypatch.setenv(MODE_VAR, "1")
    monkeypatch.delitem(sys.modules, gpu_glue._FLASHMLA_BACKEND, raising=False)
    with pytest.raises((ImportError, OSError), match="flash_mla"):  # SGLang's EAGLE worker's import, unguarded
        from sglang.srt.layers.attention.flashmla_backend import FlashMLABackend  # noqa: F401
    monkeypatch.delitem(sys.modules, gpu_glue._FLASHMLA_BACKEND, raising=False)
    gpu_glue.register()
    from sglang.srt.layers.attention.flashmla_backend import FlashMLABackend
    assert not isinstance(object(), FlashMLABackend)
    with pytest.raises(ImportError, match="working flash_mla package"):
        FlashMLABackend(None)
    monkeypatch.delitem(sys.modules, gpu_glue._FLASHMLA_BACKEND)
