"""Every SGLang symbol sgl_slim hooks still exists in the pinned SGLang (in CPU mode, as the server runs here)."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgl_slim.integration.symbols import PINNED_SGLANG, all_symbols

ROOT = Path(__file__).resolve().parents[2]


def test_pinned_sglang_is_installed():
    assert importlib.metadata.version("sglang") == PINNED_SGLANG


def test_every_hooked_symbol_resolves():
    # In a fresh process with the CPU engine on (sgl_kernel and some modules differ by device).
    code = ("import json\nfrom sgl_slim.integration.symbols import all_symbols, resolve\nmissing=[]\n"
            "for owner, syms in all_symbols().items():\n"
            "    for s in syms:\n"
            "        try: resolve(s)\n"
            "        except Exception as e: missing.append(f'{owner}: {s}: {type(e).__name__}: {e}')\n"
            "print(json.dumps(missing))")
    shim = ROOT / "sgl_slim" / "standins" / "cpu_shim"
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1",
               PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert missing == [], "\n".join(missing)


def test_table_covers_every_feature_module():
    table = all_symbols()
    assert "core" in table and len(table) >= 2
    for owner, syms in table.items():
        assert syms, f"{owner} lists no symbols"
        assert all(s.startswith(("sglang.", "sgl_kernel.")) for s in syms), owner


def test_a_missing_symbol_is_reported():
    from sgl_slim.integration.symbols import resolve
    with pytest.raises(AttributeError):
        resolve("sglang.srt.plugins.hook_registry.HookRegistry.no_such_method")
