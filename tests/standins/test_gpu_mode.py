"""The launcher's GPU stand-in mode (sgl_slim.standins.gpu): when it switches on, what it sets, which flags it
adds; and the GPU shim's ``common_ops`` defining the ops where sgl_kernel's loader imports it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgl_slim.standins import gpu

ROOT = Path(__file__).resolve().parents[2]


def _package(tmp_path, name, files):
    pkg = tmp_path / name
    (pkg / "sm90").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for f in files:
        (pkg / f).write_text("")
    return pkg


@pytest.mark.parametrize("files, missing", [
    ([], True),                                      # the wrappers alone (as scripts/gpu_wheels.sh extracts them)
    (["common_ops.py"], True),                       # a Python module of that name is no compiled library
    (["sm90/common_ops.abi3.so"], False),            # the real wheel's layout
    (["common_ops.cpython-312-x86_64-linux-gnu.so"], False),
])
def test_compiled_library_detection(tmp_path, monkeypatch, files, missing):
    _package(tmp_path, "fake_sgl_kernel_pkg", files)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gpu.compiled_sgl_kernel_missing("fake_sgl_kernel_pkg") is missing
    assert gpu.compiled_sgl_kernel_missing("no_such_package_anywhere") is True


def test_enable_sets_the_environment_and_keeps_user_values():
    env = {"PYTHONPATH": "/somewhere", "SGLANG_IS_FLASHINFER_AVAILABLE": "true"}
    gpu.enable_gpu_standins(env)
    gpu.enable_gpu_standins(env)                     # idempotent
    assert gpu.standins_enabled(env)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(gpu.SHIM_DIR), "/somewhere"]
    assert env["SGLANG_IS_FLASHINFER_AVAILABLE"] == "true"      # the user's choice stays
    for key in set(gpu.ENV) - {"SGLANG_IS_FLASHINFER_AVAILABLE"}:
        assert env[key] == gpu.ENV[key]
    assert not gpu.standins_enabled({})


def test_defaults_only_where_the_user_set_nothing():
    argv = gpu.apply_gpu_defaults(["--model-path", "m"])
    for flag in ("--attention-backend", "--sampling-backend", "--grammar-backend", "--bf16-gemm-backend",
                 "--disable-cuda-graph"):
        assert flag in argv
    assert argv[argv.index("--attention-backend") + 1] == "triton"
    argv = gpu.apply_gpu_defaults(["--prefill-attention-backend=s2o", "--cuda-graph-max-bs-decode", "8",
                                   "--sampling-backend", "flashinfer"])
    assert "--attention-backend" not in argv and "--disable-cuda-graph" not in argv
    assert argv.count("--sampling-backend") == 1
    for flag in gpu.CUDA_GRAPH_FLAGS:                # any CUDA-graph choice of the user's: no --disable-cuda-graph
        argv = gpu.apply_gpu_defaults([flag, "x"])
        assert argv.count("--disable-cuda-graph") == (flag == "--disable-cuda-graph"), (flag, argv)


def test_cuda_graph_flags_are_sglang_flags():
    """Each flag of the stand-in mode's CUDA-graph group exists in the pinned SGLang (a renamed flag would turn
    CUDA graphs off behind the user's back)."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    known = set(parser._option_string_actions)
    assert not [f for f in gpu.CUDA_GRAPH_FLAGS if f not in known]
    assert "--cuda-graph-max-bs" not in known and "--cuda-graph-bs" not in known


def test_gpu_shim_defines_the_ops_where_the_loader_imports_it():
    code = ("import common_ops, torch\n"
            "from sgl_slim.standins import gpu_ops\n"
            "missing = [n for n in gpu_ops.OP_NAMES if not hasattr(torch.ops.sgl_kernel, n)]\n"
            "assert not missing, missing\n"
            "assert not hasattr(torch.ops.sgl_kernel, 'convert_weight_packed')\n"
            "assert 'convert_weight_packed' in gpu_ops.missing_lookups()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(gpu.SHIM_DIR), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "convert_weight_packed looked up but not defined" in proc.stderr
