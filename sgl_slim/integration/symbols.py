"""Every SGLang symbol sgl_slim hooks or relies on, with the SGLang version it was written for: the launcher's
own here, each feature's in the ``HOOKED_SYMBOLS`` of its glue module (named in the feature table).

tests/integration/test_symbols.py resolves each one against the installed SGLang, so an SGLang upgrade that
moves or renames a seam fails loudly in CI instead of silently disabling a feature.
"""

from __future__ import annotations

import importlib

from sgl_slim.config import FEATURES

PINNED_SGLANG = "0.5.23"

# Used by the launcher and the plugin itself.
CORE_SYMBOLS: list[str] = [
    "sglang.srt.plugins.load_plugins",
    "sglang.srt.plugins.hook_registry.HookRegistry.register",
    "sglang.srt.plugins.hook_registry.HookRegistry.apply_hooks",
    "sglang.srt.plugins.hook_registry.HookType",
    "sglang.srt.server_args.ServerArgs.add_cli_args",
    "sglang.srt.server_args.ServerArgs.from_cli_args",
    "sglang.launch_server.run_server",
    "sglang.srt.utils.kill_process_tree",
    "sglang.srt.utils.common.is_cpu",
    "sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func",  # calls our assign_req_to_token_pool_cpu
    "sgl_kernel.load_utils._load_architecture_specific_ops",          # ends with `import common_ops`
]


def all_symbols() -> dict[str, list[str]]:
    """{owner: [dotted symbol, ...]} for the core and the glue module of every part of the feature table
    (:data:`sgl_slim.config.FEATURES`) present in this build."""
    table = {"core": list(CORE_SYMBOLS)}
    for name in (part.module for part in FEATURES):
        try:
            module = importlib.import_module(f"sgl_slim.integration.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sgl_slim.integration.{name}":
                continue
            raise
        table[name] = list(getattr(module, "HOOKED_SYMBOLS"))
    return table


def resolve(dotted: str):
    """Import the longest importable module prefix of ``dotted`` and walk the remaining attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no importable prefix in {dotted}")
