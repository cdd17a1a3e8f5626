"""sgl_slim.bench.runner.LaunchedServer when its port is taken between choosing it and binding it: started again,
once, on a new port. A few-line HTTP server stands in for SGLang (it binds the port or dies the way uvicorn does)."""

import os
import socket
import sys

import pytest
import requests

from sgl_slim.bench import runner
from sgl_slim.bench.runner import LaunchedServer

STAND_IN = """
import http.server, sys
if sys.argv[2] != "ok":
    raise SystemExit("model config not found")
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


class StandIn(LaunchedServer):
    """Starts the stand-in on ``self.port``; ``outcome`` other than "ok" makes it exit with another error."""

    def __init__(self, outcome: str = "ok"):
        super().__init__([], port=0)
        self.outcome, self.starts = outcome, []

    def command(self) -> list[str]:
        self.starts.append(self.port)
        return [sys.executable, "-c", STAND_IN, str(self.port), self.outcome]


@pytest.fixture
def taken_port():
    """A port held (bound, not listening: a health check there is refused at once) for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_port_taken_before_the_server_binds_it_is_retried_once_on_a_new_port(taken_port):
    srv = StandIn()
    srv.port = taken_port                       # the race: free when chosen, taken when the server binds
    with srv:
        assert srv.starts == [taken_port, srv.port] and srv.port != taken_port and srv.port_retried
        assert requests.get(srv.base_url + "/health_generate", timeout=10).status_code == 200
        log = srv.log()
        assert f"started again on port {srv.port}" in log and "Address already in use" in log
    assert srv.proc.poll() is not None, "the retried server was not stopped"


def test_a_second_taken_port_is_not_retried_again(taken_port, monkeypatch):
    monkeypatch.setattr(runner, "free_port", lambda start=0: taken_port)   # the new port is taken too
    srv = StandIn()
    srv.port = taken_port
    with pytest.raises(RuntimeError, match="exited with 1"):
        with srv:
            pass
    assert srv.starts == [taken_port, taken_port]


def test_a_server_that_fails_for_another_reason_is_not_retried():
    srv = StandIn(outcome="broken")
    with pytest.raises(RuntimeError, match="model config not found"):
        with srv:
            pass
    assert len(srv.starts) == 1 and not srv.port_retried


def test_plain_server_on_a_gpu_host_without_sgl_kernel_library_gets_the_standins(monkeypatch):
    from sgl_slim import launch
    from sgl_slim.standins import gpu

    monkeypatch.setattr(launch, "cuda_available", lambda: True)
    monkeypatch.setattr(gpu, "compiled_sgl_kernel_missing", lambda: True)
    server = LaunchedServer(["--model-path", "/models/m"], plain=True, env={"PYTHONPATH": "/x"})
    cmd = server.command()
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert server.env[gpu.MODE_VAR] == "1" and server.env["SGLANG_PLUGINS"] == gpu.PLUGIN_NAME
    assert server.env["PYTHONPATH"].split(os.pathsep)[0] == str(gpu.SHIM_DIR)
    assert cmd[cmd.index("--attention-backend") + 1] == "triton"
    monkeypatch.setattr(gpu, "compiled_sgl_kernel_missing", lambda: False)   # a normal GPU install: untouched
    server = LaunchedServer(["--model-path", "/models/m"], plain=True)
    cmd = server.command()
    assert gpu.MODE_VAR not in server.env and "--attention-backend" not in cmd
    assert server.env["SGLANG_PLUGINS"] == "none-but-sglang"


class Recorded:
    """A server that records its start, readiness and stop (``fail`` makes wait_ready raise)."""

    def __init__(self, name, calls, fail=False):
        self.name, self.calls, self.fail = name, calls, fail

    def start(self):
        self.calls.append(("start", self.name))

    def wait_ready(self):
        self.calls.append(("ready", self.name))
        if self.fail:
            raise TimeoutError(f"{self.name} not ready")

    def stop(self):
        self.calls.append(("stop", self.name))


def test_running_starts_all_before_waiting_and_stops_all_whatever_happens():
    calls = []
    servers = {"a": Recorded("a", calls), "b": Recorded("b", calls)}
    with runner.running(servers) as got:
        assert got is servers
        calls.append(("work", None))
    assert calls == [("start", "a"), ("start", "b"), ("ready", "a"), ("ready", "b"), ("work", None),
                     ("stop", "a"), ("stop", "b")]
    calls.clear()
    with pytest.raises(TimeoutError, match="b not ready"):
        with runner.running({"a": Recorded("a", calls), "b": Recorded("b", calls, fail=True)}):
            calls.append(("work", None))
    assert ("work", None) not in calls and calls[-2:] == [("stop", "a"), ("stop", "b")]
