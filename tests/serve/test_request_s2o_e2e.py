"""Per-request S2O settings on a CPU server started dense (``--s2o --s2o-tau 0``): a request's own ``s2o_tau``
runs it sparse, alone or in a concurrent batch with requests that sent nothing (those stay on the stock dense
path); ``s2o: false`` and the server's own tau change nothing."""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serving import SERVE_COMMON, shared_server

pytestmark = pytest.mark.e2e

MIN_LENGTH = 64
s2o_server = shared_server(["--model", "demo", *SERVE_COMMON, "--s2o", "--s2o-tau", "0", "--s2o-min-length",
                            str(MIN_LENGTH), "--s2o-block-size", "16", "--s2o-segment-size", "32",
                            "--s2o-variant", "v1"])
LOG_LINE = re.compile(r"S2O prefill rid=(\S+) kv_len=\d+ new=\d+ density=[0-9.]+ (.*) \(mean of")


def generate(srv, text, settings=None):
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
    if settings is not None:
        body["sgl_slim"] = settings
    r = requests.post(f"{srv.base_url}/generate", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def how(srv, out) -> list[str]:
    """What the S2O backend logged for this request's prefill chunks."""
    return [line for rid, line in LOG_LINE.findall(srv.log()) if rid == out["meta_info"]["id"]]


def long_text(seed: int) -> str:
    return " ".join(f"item{seed}x{i}" for i in range(90))          # well over MIN_LENGTH tokens


def test_a_request_tau_runs_sparse_beside_dense_requests(s2o_server):
    alone = generate(s2o_server, long_text(1), {"s2o_tau": 1.0})
    numbers = alone["meta_info"]["sgl_slim"]
    assert numbers["s2o_sparse"] is True and numbers["s2o_tau"] == 1.0 and numbers["s2o_density"] < 1.0, numbers
    assert how(s2o_server, alone) == ["tau=1 (request)"]
    # a concurrent batch mixing it with requests that sent nothing: each gets what it gets alone
    texts = [long_text(1), long_text(2), long_text(1), long_text(3)]
    settings = [{"s2o_tau": 1.0}, None, {"s2o_tau": 1.0}, None]
    with ThreadPoolExecutor(len(texts)) as pool:
        batch = list(pool.map(lambda ts: generate(s2o_server, *ts), zip(texts, settings)))
    for s, out in zip(settings, batch):
        got = out["meta_info"]["sgl_slim"]
        if s is None:
            assert got == {"s2o_density": 1.0, "s2o_sparse": False}, got
            assert all(line == "dense (--s2o-tau 0)" for line in how(s2o_server, out))
        else:
            assert got["s2o_sparse"] is True and got["s2o_tau"] == 1.0, got
            assert out["output_ids"] == alone["output_ids"]


def test_dense_and_the_servers_own_tau_change_nothing(s2o_server):
    plain = generate(s2o_server, long_text(4))
    for settings in ({"s2o": False}, {"s2o_tau": 0}, {"s2o": True}):
        out = generate(s2o_server, long_text(4), settings)
        assert out["output_ids"] == plain["output_ids"] and out["text"] == plain["text"], settings
        numbers = out["meta_info"]["sgl_slim"]
        assert numbers["s2o_sparse"] is False and numbers["s2o_density"] == 1.0, numbers
    dense = generate(s2o_server, long_text(5), {"s2o": False})
    assert how(s2o_server, dense) == ["dense (the request's sgl_slim settings)"]


def test_a_tau_beyond_fp32_is_served_and_the_server_lives_on(s2o_server):
    """Any finite s2o_tau passes the request's checks; one beyond fp32 (the attention API's dtype) made the
    API refuse an inf tau inside the scheduler, and the server died. It runs as fp32's largest tau."""
    huge = generate(s2o_server, long_text(6), {"s2o_tau": 1e300})
    assert huge["meta_info"]["sgl_slim"]["s2o_sparse"] is True, huge["meta_info"]
    largest = generate(s2o_server, long_text(6), {"s2o_tau": 3.4028234663852886e38})
    assert huge["output_ids"] == largest["output_ids"]
    assert generate(s2o_server, long_text(7))["output_ids"]
