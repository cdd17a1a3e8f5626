"""sgl_slim.integration.standins.cpu_parallel: the hook turns PyNccl off for CPU process groups, whichever way SGLang
passes the argument, and leaves every other argument alone."""

import inspect

import pytest

pytest.importorskip("sglang")

from sgl_slim.integration.standins.cpu_parallel import no_pynccl  # noqa: E402


def test_use_pynccl_is_the_fourth_parameter_of_sglangs_function():
    from sglang.srt.distributed.parallel_state import init_model_parallel_group

    assert list(inspect.signature(init_model_parallel_group).parameters)[3] == "use_pynccl"


def test_keyword_call():
    args, kwargs = no_pynccl([[0, 1]], 0, "gloo", group_name="tp", use_pynccl=None)
    assert args == ([[0, 1]], 0, "gloo") and kwargs == {"group_name": "tp", "use_pynccl": False}


def test_positional_call():
    args, kwargs = no_pynccl([[0, 1]], 1, "gloo", True, False, group_name="tp")
    assert args == ([[0, 1]], 1, "gloo", False, False) and kwargs == {"group_name": "tp"}


def test_the_hooked_function_really_receives_false():
    from sglang.srt.distributed import parallel_state

    seen = {}
    sig = inspect.signature(parallel_state.init_model_parallel_group)

    def fake(*a, **k):
        seen.update(sig.bind(*a, **k).arguments)

    args, kwargs = no_pynccl([[0, 1]], 0, "gloo", use_custom_allreduce=False)
    fake(*args, **kwargs)
    assert seen["use_pynccl"] is False and seen["use_custom_allreduce"] is False
