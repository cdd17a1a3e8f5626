"""The launcher's GPU stand-in mode: SGLang on a GPU host where sgl_kernel's compiled library is missing.

``python -m sgl_slim.launch`` switches it on by itself when a CUDA device is present and the installed
``sgl_kernel`` package has no compiled ``common_ops`` library (its Python wrappers alone, as
scripts/gpu_wheels.sh installs them on a host whose torch the wheel's library does not match). Then, for the
launcher and every process SGLang starts (through the environment):

- the ``gpu_shim`` folder goes on the path: sgl_kernel's loader imports its ``common_ops``, which defines the
  plain-torch ops of :mod:`sgl_slim.standins.gpu_ops`;
- :data:`ENV` switches off what needs other compiled libraries (FlashInfer, the C++ radix tree, torch's C
  DLPack exchange in tvm_ffi) and SGLang's sgl_kernel version check;
- :data:`MODE_VAR` tells ``sgl_slim.integration.standins.gpu`` (an SGLang plugin, loaded in every process) to
  guard the CuTe DSL dual GEMM, which imports ``cutlass`` unconditionally on CUDA;
- :func:`apply_gpu_defaults` adds the SGLang flags of :data:`DEFAULT_FLAGS` that the user did not set.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parent / "gpu_shim"
MODE_VAR = "SGLSLIM_GPU_STANDINS"
PLUGIN_NAME = "sgl_slim_gpu_standins"   # its SGLang plugin entry point (pyproject.toml)

ENV = {
    "SGLANG_IS_FLASHINFER_AVAILABLE": "false",          # no flashinfer package / JIT on such a host
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python",  # the C++ radix tree is another compiled module
    "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1",              # tvm_ffi would build a torch extension for it
    "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",        # the wrappers' version is checked against the library
}

# SGLang 0.5.23's CUDA-graph flags: setting any of them leaves the CUDA-graph choice to the user. (There is no
# --cuda-graph-max-bs any more: argparse rejects it as an ambiguous prefix of the -decode / -prefill forms.)
CUDA_GRAPH_FLAGS = (
    "--disable-cuda-graph", "--disable-decode-cuda-graph", "--disable-prefill-cuda-graph", "--cuda-graph-config",
    "--cuda-graph-backend-decode", "--cuda-graph-backend-prefill", "--cuda-graph-max-bs-decode",
    "--cuda-graph-max-bs-prefill", "--cuda-graph-bs-decode", "--cuda-graph-bs-prefill",
)

# SGLang flag -> value (None: a switch), each added only when the user set none of the flags in its group.
DEFAULT_FLAGS = (
    (("--attention-backend", "--prefill-attention-backend", "--decode-attention-backend"),
     "--attention-backend", "triton"),                   # Triton kernels: no compiled attention library
    (("--sampling-backend",), "--sampling-backend", "pytorch"),
    (("--grammar-backend",), "--grammar-backend", "none"),
    (("--bf16-gemm-backend",), "--bf16-gemm-backend", "torch"),
    (CUDA_GRAPH_FLAGS, "--disable-cuda-graph", None),
)

_COMPILED_SUFFIXES = (".so", ".pyd")


def compiled_sgl_kernel_missing(package: str = "sgl_kernel") -> bool:
    """True when no ``sgl_kernel`` package is installed or it has no compiled ``common_ops`` library (looked up
    the way its loader looks: ``sm90/``, ``sm100/`` or the package folder). Nothing is imported."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return True
    for folder in spec.submodule_search_locations:
        for sub in ("sm90", "sm100", "."):
            for path in (Path(folder) / sub).glob("common_ops.*"):
                if path.name.endswith(_COMPILED_SUFFIXES) or ".so." in path.name:
                    return False
    return True


def enable_gpu_standins(environ=os.environ) -> None:
    """Stand-in mode for this process (``environ`` is ``os.environ``; before sglang is imported) and the
    processes started with ``environ``."""
    environ[MODE_VAR] = "1"
    for key, value in ENV.items():
        environ.setdefault(key, value)
    shim = str(SHIM_DIR)
    if environ is os.environ and shim not in sys.path:
        sys.path.insert(0, shim)
    paths = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if shim not in paths:
        environ["PYTHONPATH"] = os.pathsep.join([shim] + paths)


def standins_enabled(environ=os.environ) -> bool:
    return environ.get(MODE_VAR) == "1"


def apply_gpu_defaults(sglang_argv: list[str]) -> list[str]:
    """SGLang's flags for the stand-in mode (:data:`DEFAULT_FLAGS`), where the user set none of a group."""
    given = {a.split("=", 1)[0] for a in sglang_argv}
    extra = []
    for group, flag, value in DEFAULT_FLAGS:
        if not given.intersection(group):
            extra += [flag] if value is None else [flag, value]
    return extra + sglang_argv
