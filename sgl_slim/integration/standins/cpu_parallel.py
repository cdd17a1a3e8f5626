"""``--tp-size`` / ``--dp-size`` > 1 on the CPU engine.

SGLang 0.5.23 creates a PyNccl communicator for every process group of more than one rank unless the platform
is NPU/XPU. With the CUDA build of torch that SGLang pins, the NCCL library loads even on a machine without a
GPU, and the communicator then fails on ``torch.cuda.device("cpu")`` ("Expected a cuda device, but got: cpu"),
so every multi-rank CPU launch dies at start-up. BEFORE hook on
``parallel_state.init_model_parallel_group``: on the CPU engine, ``use_pynccl=False``; CPU tensors then use
SGLang's own CPU path (gloo ``all_reduce``, or its shared-memory kernel where it has one).
The other half, telling SGLang which cores each rank gets (it refuses more ranks than NUMA nodes otherwise),
is done by the launcher (``sgl_slim.launch.cpu_thread_binding``).
Installed in servers started by ``python -m sgl_slim.launch``; does nothing unless SGLang runs on the CPU.
"""

from __future__ import annotations

from sgl_slim.config import SlimConfig

_GROUP = "sglang.srt.distributed.parallel_state.init_model_parallel_group"

HOOKED_SYMBOLS: list[str] = [
    _GROUP,
    "sglang.srt.distributed.device_communicators.pynccl.PyNcclCommunicator",
]

_REGISTERED = False


def install(cfg: SlimConfig) -> None:  # noqa: ARG001
    global _REGISTERED
    if _REGISTERED:
        return
    from sglang.srt.utils.common import is_cpu  # noqa: PLC0415

    if not is_cpu():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    HookRegistry.register(_GROUP, no_pynccl, HookType.BEFORE)
    _REGISTERED = True


def no_pynccl(*args, **kwargs):
    """(args, kwargs) of ``init_model_parallel_group`` with ``use_pynccl=False`` (its 4th parameter)."""
    if len(args) > 3:
        args = args[:3] + (False,) + args[4:]
    else:
        kwargs = dict(kwargs, use_pynccl=False)
    return args, kwargs
