"""The end-to-end tests' server pool (tests/serving.py) with stand-in servers: equal flags share one server, a
server stops after the last test that needs it, and no more are alive than a test needs plus one started early."""

from types import SimpleNamespace

import pytest

import serving
from serving import ServerPool, server_spec, shared_server

A, B, C = (["--model", "demo", "--dtype", "float32", *extra] for extra in ([], ["--idpruner"], ["--samp"]))


class FakeServer:
    events: list = []

    def __init__(self, args, *, port, plain=False, env=None):
        self.spec = server_spec(args, plain=plain, env=env)

    def start(self):
        FakeServer.events.append(("start", self.spec))
        return self

    def wait_ready(self, timeout=None):
        return self

    def stop(self):
        FakeServer.events.append(("stop", self.spec))


@pytest.fixture
def fake_servers(monkeypatch):
    FakeServer.events = []
    monkeypatch.setattr(serving, "SlimServer", FakeServer)
    return FakeServer.events


def item(nodeid, **fixtures):
    """A collected test needing ``fixtures`` ({name: fixture function or (fixture, param)})."""
    defs, params = {}, {}
    for name, fx in fixtures.items():
        if isinstance(fx, tuple):
            fx, params[name] = fx
        defs[name] = [SimpleNamespace(func=fx)]
    out = SimpleNamespace(nodeid=nodeid, fixturenames=list(fixtures),
                          _fixtureinfo=SimpleNamespace(name2fixturedefs=defs))
    if params:
        out.callspec = SimpleNamespace(params=params)
    return out


def run(pool, items):
    pool.plan(items)
    alive = []
    for it in items:
        pool.before(it.nodeid)
        for name in it.fixturenames:     # what the fixtures would do
            for spec in serving.specs_of(SimpleNamespace(**{**vars(it), "fixturenames": [name]})):
                assert spec in pool.live, f"{it.nodeid}: {spec.describe()} not started"
        alive.append(len(pool.live))
        pool.after(it.nodeid)
    return alive


def test_equal_flags_in_two_modules_share_one_server(fake_servers):
    a1, a2, b = shared_server(A), shared_server(list(A)), shared_server(B)
    items = [item("x.py::t1", s=a1), item("y.py::t2", s=a2), item("y.py::t3", s=b)]
    run(ServerPool(max_alive=2), items)
    starts = [spec for what, spec in fake_servers if what == "start"]
    assert starts == [server_spec(A), server_spec(B)], [s.describe() for s in starts]


def test_a_server_stops_after_the_last_test_that_needs_it(fake_servers):
    a, b, c = shared_server(A), shared_server(B), shared_server(C)
    items = [item("x.py::t1", s=a), item("x.py::t2", s=a, t=b), item("x.py::t3", t=b), item("z.py::t4", u=c)]
    pool = ServerPool(max_alive=2)
    alive = run(pool, items)
    assert fake_servers.index(("stop", server_spec(A))) < fake_servers.index(("start", server_spec(C))), fake_servers
    # B started early beside A (same file, room for two); C early beside B (the very next test)
    assert alive == [2, 2, 2, 1], alive
    assert pool.live == {}


def test_no_early_start_beyond_max_alive_or_into_another_file(fake_servers):
    a, b, c = shared_server(A), shared_server(B), shared_server(C)
    alive = run(ServerPool(max_alive=1), [item("x.py::t1", s=a), item("x.py::t2", s=b)])
    assert alive == [1, 1], alive
    fake_servers.clear()
    items = [item("x.py::t1", s=a), item("x.py::t2"), item("x.py::t3"), item("y.py::t4", s=c)]
    alive = run(ServerPool(max_alive=2), items)
    assert alive == [1, 0, 1, 1], alive     # C (another file) starts with the test just before its own
    # a test that needs three servers gets three, whatever max_alive says
    alive = run(ServerPool(max_alive=1), [item("x.py::t1", s=a, t=b, u=c)])
    assert alive == [3], alive


def test_a_parametrized_server_starts_only_the_tests_own_param(fake_servers):
    scaled = shared_server(params={"tp": [*A, "--tp-size", "2"], "dp": [*A, "--dp-size", "2"]})
    items = [item("x.py::t[tp]", s=(scaled, "tp")), item("x.py::t[dp]", s=(scaled, "dp"))]
    alive = run(ServerPool(max_alive=1), items)
    assert alive == [1, 1], alive
    starts = [spec.args[-2:] for what, spec in fake_servers if what == "start"]
    assert starts == [("--tp-size", "2"), ("--dp-size", "2")], starts


def test_model_dirs_are_resolved_at_start_not_at_collection(fake_servers, monkeypatch):
    built = []
    monkeypatch.setitem(serving.MODEL_DIRS, "{test_model}", lambda: built.append(1) or "/models/test")
    fx = shared_server(["--model-path", "{test_model}"])
    pool = ServerPool()
    pool.plan([item("x.py::t1", s=fx)])
    assert built == []
    pool.before("x.py::t1")
    assert built == [1]
    (started,) = [spec for what, spec in fake_servers if what == "start"]
    assert started.args == ("--model-path", "/models/test")
    pool.stop_all()


def test_an_attached_fixture_never_starts_a_server(fake_servers, monkeypatch):
    monkeypatch.setenv("SGL_SLIM_TEST_ATTACH", "s=30000,u[dp]=30001")
    a, b = shared_server(A), shared_server(B)
    scaled = shared_server(params={"tp": [*A, "--tp-size", "2"], "dp": [*A, "--dp-size", "2"]})
    items = [item("x.py::t1", s=a, t=b), item("x.py::t2[tp]", u=(scaled, "tp")),
             item("x.py::t3[dp]", u=(scaled, "dp"))]
    pool = ServerPool(max_alive=1)
    pool.plan(items)
    for it in items:
        pool.before(it.nodeid)
        pool.after(it.nodeid)
    starts = [spec for what, spec in fake_servers if what == "start"]
    assert starts == [server_spec(B), server_spec([*A, "--tp-size", "2"])], [s.describe() for s in starts]
