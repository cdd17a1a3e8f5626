"""Session-scoped sgl_slim demo servers shared by the serving tests in this folder (bench, bad input, frontend,
load): one image server (IDPruner on) and one audio server (Samp on), started together because startup
dominates on the CPU. Ports 35101/35102 (this area's range: 35000-35999)."""

import os

import pytest
import requests

from serving import SlimServer

COMMON = ["--dtype", "float32", "--max-total-tokens", "8192", "--context-length", "1024"]
VL_ARGS = ["--model", "demo", *COMMON, "--idpruner", "--idpruner-keep-ratio", "0.25"]
AUDIO_ARGS = ["--model", "demo-audio", *COMMON, "--samp"]
CONTEXT_LENGTH = 1024


@pytest.fixture(scope="session")
def slim_servers():
    """Set SGL_SLIM_SERVE_PORTS=VL_PORT,AUDIO_PORT to reuse servers already running with the same flags
    (developing the tests); by default both are started here and stopped at the end of the session."""
    reuse = os.environ.get("SGL_SLIM_SERVE_PORTS")
    if reuse:
        vl_port, audio_port = (int(p) for p in reuse.split(","))
        specs = {"vl": SlimServer(VL_ARGS, port=vl_port), "audio": SlimServer(AUDIO_ARGS, port=audio_port)}
        for srv in specs.values():
            assert requests.get(f"{srv.base_url}/health_generate", timeout=120).status_code == 200, srv.base_url
        yield specs
        return
    specs = {"vl": SlimServer(VL_ARGS, port=35101), "audio": SlimServer(AUDIO_ARGS, port=35102)}
    try:
        for srv in specs.values():
            srv.start()
        for srv in specs.values():
            srv.wait_ready()
        yield specs
    finally:
        for srv in specs.values():
            srv.stop()


@pytest.fixture(scope="session")
def vl_server(slim_servers):
    return slim_servers["vl"]


@pytest.fixture(scope="session")
def audio_server(slim_servers):
    return slim_servers["audio"]
