"""Shared pytest setup: GPU tests (marked ``gpu``) skip without CUDA; end-to-end tests (marked ``e2e``) get
their servers from one session-wide pool (``serving.ServerPool``: equal flags share one server, each stopped
after the last test that needs it)."""

import pytest
import torch

from serving import ServerPool

_POOL = ServerPool()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    _POOL.plan(session.items)      # the final run order, after selection and reordering


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _POOL.before(item.nodeid)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    _POOL.after(item.nodeid)


def pytest_sessionfinish(session, exitstatus):
    _POOL.stop_all()


def pytest_terminal_summary(terminalreporter):
    if _POOL.started:
        terminalreporter.write_line(f"sgl_slim test servers started: {len(_POOL.started)}")
        for spec in _POOL.started:
            terminalreporter.write_line(f"  {spec.describe()}")


@pytest.fixture(scope="session")
def server_pool():
    return _POOL
