"""Compile every Triton kernel the package launches for a Hopper GPU (sm_90), on a machine without one.

Run as a script (``python tests/_hopper_compile.py``; TRITON_INTERPRET must be unset): the package's host entry
points run on small CPU tensors while ``JITFunction.run`` is replaced by a compile-only launcher that derives each
launch's signature and constexprs from its arguments and compiles the kernel for ``GPUTarget("cuda", 90, 32)``
(Triton's own front end, optimiser and ptxas; nothing runs, so the outputs are left unwritten).  The interpreter
tests check what the kernels compute; this catches what only the compiler rejects (a kernel the interpreter
runs can still fail to compile: e.g. return statements of different types in one function).  Prints one line
per distinct launch and "OK <n>" at the end; the first failure raises with the kernel's name.
"""

from __future__ import annotations

import inspect
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

TARGET = GPUTarget("cuda", 90, 32)
SEEN: dict = {}


def compile_only(self: JITFunction, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in self.arg_names}   # num_warps, num_stages, ...
    bound = inspect.signature(self.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for param, (name, value) in zip(self.params, bound.arguments.items()):
        if param.is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = mangle_type(value)      # Triton's own name for the argument's type
    key = (self.fn.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
    if key in SEEN:
        return None
    try:
        triton.compile(ASTSource(self, signature, constexprs), target=TARGET, options=options)
    except Exception as exc:
        raise RuntimeError(f"{self.fn.__name__} does not compile for sm_90 with {constexprs} {options}") from exc
    SEEN[key] = True
    print(f"compiled {self.fn.__name__} {options} {constexprs}", flush=True)
    return None


def _s2o_launches() -> None:
    from sgl_slim.attention import VARIANTS, s2o_triton
    torch.manual_seed(0)
    L, Hq, Hkv, D = 600, 8, 2, 128
    q = torch.randn(L, Hq, D, dtype=torch.bfloat16)
    k = torch.randn(L + 8, Hkv, D, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(L + 8)[:L].to(torch.int32)
    base = dict(qo_indptr=torch.tensor([0, L]), kv_indptr=torch.tensor([0, L]), block_size=128, segment_size=256,
                q_tile=128, sm_scale=D ** -0.5)
    fp8_k, fp8_v = (k.float() / 0.5).to(torch.float8_e4m3fn), (v.float() / 0.5).to(torch.float8_e4m3fn)
    for contiguous in (True, False):
        idx = torch.arange(L, dtype=torch.int32) if contiguous else slots
        runs = [dict(tau=0.0)] + [dict(tau=0.01, **VARIANTS[name]) for name in sorted(VARIANTS)]
        runs += [dict(tau=0.01, **VARIANTS["v4"], audit_fp8=True), dict(tau=0.01, **VARIANTS["v4"], audit_split=True),
                 dict(tau=0.01, **VARIANTS["v4"], audit_split=True, audit_heads=4, audit_n=32),
                 dict(tau=0.01, **VARIANTS["v4"], audit_split=True, audit_heads=1, audit_n=128),
                 dict(tau=0.01, **VARIANTS["v5"], audit_split=True),
                 dict(tau=0.01, stop="remaining", compensate=True, tail_estimate="estimate")]
        for kw in runs:
            s2o_triton.s2o_paged(q, k, v, kv_indices=idx, kv_contiguous=contiguous, return_lse=True, **base, **kw)
        for audit in ({}, {"audit_fp8": True}, {"audit_split": True}):
            s2o_triton.s2o_paged(q, fp8_k, fp8_v, kv_indices=idx, kv_contiguous=contiguous, tau=0.01, k_scale=0.5,
                                 v_scale=0.5, **audit, **base, **VARIANTS["v4"])


def _selection_launches() -> None:
    from sgl_slim.audio.dpp_triton import dpp_picks_triton
    from sgl_slim.vision import idpruner_triton
    f = torch.nn.functional.normalize(torch.randn(300, 64), dim=-1)
    idpruner_triton.mmr_order_triton(f @ f.T, torch.rand(300), 40, 0.5)
    idpruner_triton.mmr_select_fused(f, torch.rand(300), 40, 0.5)
    dpp_picks_triton((f @ f.T).double(), 40, 1e-6)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels, it does not interpret them")
    JITFunction.run = compile_only
    _s2o_launches()
    _selection_launches()
    print(f"OK {len(SEEN)}")


if __name__ == "__main__":
    main()
