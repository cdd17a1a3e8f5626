"""Spec tests use tiny tensors: one torch thread is faster, and on a loaded 2-core machine far faster (intra-op
threads spinning against other processes turned a 20 s draft-training test into minutes)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
