"""Start SGLang's HTTP server with sgl_slim loaded: the SGLang half of ``python -m sgl_slim.launch``.

``sgl_slim.launch`` turns argv into a validated :class:`~sgl_slim.config.SlimConfig` and SGLang's argv, and
prepares the process (CPU mode, demo models, the configuration in the environment). Everything from there on
needs sglang, so it lives here: the GPU stand-in mode where sgl_kernel's library is missing, loading the
plugins, SGLang's argument parser with each enabled feature's ``adjust_server_args``, the CPU rank binding,
``run_server`` and the process-tree clean-up.

The SGLang symbols used here are in :data:`sgl_slim.integration.symbols.CORE_SYMBOLS`.
"""

from __future__ import annotations

import argparse
import logging
import os

from sgl_slim.config import ConfigError, SlimConfig
from sgl_slim.launch import add_slim_arguments, cpu_thread_binding
from sgl_slim.standins import gpu as gpu_standins

logger = logging.getLogger("sgl_slim")


def build_server_args(cfg: SlimConfig, sglang_argv: list[str], *, cpu: bool):
    """SGLang's ``ServerArgs`` from ``sglang_argv``, after each enabled feature's ``adjust_server_args``.

    The parser has sgl_slim's group too, so ``--help`` lists both; a feature that cannot run with the given
    flags ends the process with status 2 and a message naming the flag."""
    from sglang.srt.server_args import ServerArgs  # noqa: PLC0415

    from sgl_slim.integration.plugin import feature_module  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m sgl_slim.launch")
    ServerArgs.add_cli_args(parser)
    add_slim_arguments(parser)
    args = parser.parse_args(sglang_argv)
    for feature in cfg.enabled_features():
        try:
            module = feature_module(feature)
        except NotImplementedError as exc:
            parser.error(str(exc))
        if hasattr(module, "adjust_server_args"):
            try:
                module.adjust_server_args(cfg, args, cpu=cpu)
            except ConfigError as exc:
                parser.error(str(exc))
    return ServerArgs.from_cli_args(args)


def install_plugins() -> None:
    """Load SGLang's plugins in this (the launcher's) process and apply their hooks. The configuration must
    already be in the environment (:meth:`SlimConfig.to_env`): the plugin reads it there."""
    from sglang.srt.plugins import load_plugins  # noqa: PLC0415
    from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: PLC0415

    from sgl_slim.integration import plugin  # noqa: PLC0415

    load_plugins()
    plugin.register()  # explicit too: a missing entry point (not pip-installed) must not drop sgl_slim
    HookRegistry.apply_hooks()


def prepare_gpu_standins(sglang_argv: list[str], *, cpu: bool) -> list[str]:
    """On a GPU host whose sgl_kernel has no compiled library, the GPU stand-in mode (sgl_slim/standins/gpu.py):
    environment for this process and SGLang's, and SGLang's flags for it where the user set none. Must run
    before sglang is imported; returns SGLang's argv."""
    if cpu or not gpu_standins.compiled_sgl_kernel_missing():
        return sglang_argv
    gpu_standins.enable_gpu_standins()
    logger.info("sgl_slim: sgl_kernel has no compiled library here: GPU stand-in mode (plain-torch sgl_kernel "
                "ops, Triton attention, no CUDA graphs where not set otherwise)")
    return gpu_standins.apply_gpu_defaults(sglang_argv)


def serve(cfg: SlimConfig, sglang_argv: list[str], *, cpu: bool) -> None:
    """Run SGLang's server until it exits, then end every process it started."""
    sglang_argv = prepare_gpu_standins(sglang_argv, cpu=cpu)
    install_plugins()
    server_args = build_server_args(cfg, sglang_argv, cpu=cpu)
    world = server_args.tp_size * server_args.dp_size * server_args.pp_size
    if cpu and world > 1 and not os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
        # SGLang's CPU engine binds each rank to a NUMA node and refuses more ranks than nodes unless told
        # which cores each rank gets: split this process's cores among the ranks.
        os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(world, sorted(os.sched_getaffinity(0)))
        logger.info("sgl_slim: %d CPU ranks: SGLANG_CPU_OMP_THREADS_BIND=%s", world,
                    os.environ["SGLANG_CPU_OMP_THREADS_BIND"])
    logger.info("sgl_slim: features on: %s", ", ".join(cfg.enabled_features()) or "none")

    from sglang.launch_server import run_server  # noqa: PLC0415
    from sglang.srt.utils import kill_process_tree  # noqa: PLC0415

    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
