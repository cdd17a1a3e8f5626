"""The demo servers the serving tests in this folder share (bench, bad input, frontend, load, metrics, scale-out):
one image server (IDPruner on) and one audio server (Samp on), from the session's server pool
(tests/serving.py), so any other module asking for the same flags gets the same servers.
``SGL_SLIM_TEST_ATTACH=vl_server=PORT,audio_server=PORT`` reuses servers already running with these flags."""

import pytest

from serving import AUDIO_ARGS, VL_ARGS, shared_server

vl_server = shared_server(VL_ARGS)
audio_server = shared_server(AUDIO_ARGS)


@pytest.fixture(scope="session")
def slim_servers(vl_server, audio_server):
    return {"vl": vl_server, "audio": audio_server}
