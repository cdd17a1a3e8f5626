"""End to end on the CPU demo server, float32 (rounding cannot flip a greedy token):

* ``--s2o --s2o-tau 0 --s2o-min-length 0`` gives exactly the greedy tokens of the same server without
  ``--s2o``: a chunked prompt, a radix-cache hit, a batch of several requests in one prefill, a short prompt;
  and every one of those prefills went through S2O (its log line names the request);
* with tau > 0 the server serves and logs densities below 1 for long prompts, and dense for prompts
  shorter than ``--s2o-min-length``.

Servers are started once per module (two at a time at most), each in its own process group, killed after.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 1200           # the shared CPU machine can take minutes to import SGLang
REQUEST_S = 600
COMMON = ["--model", "demo", "--dtype", "float32", "--chunked-prefill-size", "64", "--max-total-tokens", "8192",
          "--max-running-requests", "16"]
S2O_SMALL = ["--s2o-block-size", "16", "--s2o-segment-size", "32"]  # short prompts still have a prefix
LOG_LINE = re.compile(r"S2O prefill rid=(\S+) kv_len=(\d+) new=(\d+) density=([0-9.]+) (.*)")


_TAKEN: set[int] = set()


def _free_port(lo: int = 31000, hi: int = 31999) -> int:
    for port in random.Random(os.getpid()).sample(range(lo, hi + 1), hi - lo + 1):
        if port in _TAKEN:       # a server started here may not have bound its port yet
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port
    raise RuntimeError("no free port in 31000-31999")


class Server:
    def __init__(self, name: str, extra: list[str], tmp: Path):
        self.port = _free_port()
        self.log = tmp / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sgl_slim.launch", *COMMON, "--port", str(self.port), *extra]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.time() + STARTUP_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.check_alive()
                        return
            except OSError:
                pass
            time.sleep(3)
        raise TimeoutError(f"server not ready after {STARTUP_S} s:\n{self.log_text()[-4000:]}")

    def check_alive(self) -> None:
        """The answer must come from THIS server (not another one holding the port)."""
        time.sleep(1)
        if self.proc.poll() is not None or "address already in use" in self.log_text():
            raise RuntimeError(f"server on port {self.port} is not ours:\n{self.log_text()[-4000:]}")

    def generate(self, input_ids, max_new_tokens: int = 8):
        body = json.dumps({"input_ids": input_ids, "sampling_params": {
            "temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}).encode()
        req = urllib.request.Request(self.url + "/generate", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=REQUEST_S) as r:
            return json.loads(r.read())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def s2o_lines(self) -> list[tuple[str, int, int, float, str]]:
        return [(m[1], int(m[2]), int(m[3]), float(m[4]), m[5]) for m in LOG_LINE.finditer(self.log_text())]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


LONG = _ids(150, 1)                       # chunked: 150 tokens through --chunked-prefill-size 64
RADIX = LONG[:96] + _ids(21, 2)           # shares 96 tokens with LONG -> radix-cache hit
BATCH = [_ids(n, 10 + n) for n in (9, 13, 17, 20)]   # 59 tokens: one prefill batch of four
SHORT = _ids(5, 3)


def _workload(server: Server) -> dict:
    """The same request sequence on every server (order matters for the radix cache)."""
    out = {"long": server.generate(LONG), "radix": server.generate(RADIX), "batch": server.generate(BATCH)}
    with ThreadPoolExecutor(3) as pool:   # concurrent clients too
        out["concurrent"] = list(pool.map(server.generate, [SHORT, BATCH[1], LONG[:40]]))
    return out


def _start_all(specs: dict[str, list[str]], tmp: Path) -> dict[str, Server]:
    servers = {name: Server(name, extra, tmp) for name, extra in specs.items()}
    try:
        for s in servers.values():
            s.wait_ready()
    except BaseException:
        for s in servers.values():
            s.kill()
        raise
    return servers


@pytest.fixture(scope="module")
def tau0_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s2o_e2e")
    servers = _start_all({"dense": [], "s2o": ["--s2o", "--s2o-tau", "0", "--s2o-min-length", "0", *S2O_SMALL]},
                         tmp)
    try:
        results = {name: _workload(s) for name, s in servers.items()}
        for s in servers.values():
            s.check_alive()
        lines = servers["s2o"].s2o_lines()
        assert not servers["dense"].s2o_lines(), "the server without --s2o must not run S2O"
    finally:
        for s in servers.values():
            s.kill()
    return results, lines


def _flat(results: dict) -> dict[str, dict]:
    flat = {"long": results["long"], "radix": results["radix"]}
    flat.update({f"batch{i}": r for i, r in enumerate(results["batch"])})
    flat.update({f"concurrent{i}": r for i, r in enumerate(results["concurrent"])})
    return flat


def test_tau0_gives_the_dense_servers_greedy_tokens(tau0_runs):
    results, _ = tau0_runs
    dense, s2o = _flat(results["dense"]), _flat(results["s2o"])
    for key, d in dense.items():
        s = s2o[key]
        assert len(d["output_ids"]) == 8
        assert s["output_ids"] == d["output_ids"], f"{key}: s2o {s['output_ids']} != dense {d['output_ids']}"


def test_tau0_served_every_prefill_through_s2o_chunked_and_cached(tau0_runs):
    results, lines = tau0_runs
    s2o = results["s2o"]
    by_rid: dict[str, list] = {}
    for rid, kv_len, new, density, how in lines:
        by_rid.setdefault(rid, []).append((kv_len, new, density, how))
    long_rid = s2o["long"]["meta_info"]["id"]
    assert [(kv, new) for kv, new, *_ in by_rid[long_rid]] == [(64, 64), (128, 64), (150, 22)], \
        "the 150-token prompt should prefill in chunks of 64 through S2O"
    radix = s2o["radix"]["meta_info"]
    assert radix["cached_tokens"] >= 64, f"expected a radix-cache hit, got {radix['cached_tokens']} cached"
    kv_len, new, *_ = by_rid[radix["id"]][0]
    assert kv_len == len(RADIX) and new == len(RADIX) - radix["cached_tokens"]
    for r in s2o["batch"]:
        assert r["meta_info"]["id"] in by_rid, "every batched request must be served by S2O"
    assert all(density == 1.0 and "tau=0" in how for *_, density, how in lines), "tau = 0 is dense"


def test_tau0_batch_shared_one_prefill(tau0_runs):
    results, lines = tau0_runs
    rids = [r["meta_info"]["id"] for r in results["s2o"]["batch"]]
    positions = [i for i, line in enumerate(lines) if line[0] in rids]
    # the four requests' lines come out of one forward: adjacent in the log, each a whole prompt
    assert positions == list(range(positions[0], positions[0] + 4)), f"batch split over forwards: {positions}"


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s2o_e2e_sparse")
    servers = _start_all({"sparse": ["--s2o", "--s2o-tau", "0.5", "--s2o-min-length", "64", *S2O_SMALL]}, tmp)
    server = servers["sparse"]
    try:
        long_result = server.generate(_ids(256, 7))
        short_result = server.generate(SHORT)
        lines = server.s2o_lines()
    finally:
        server.kill()
    return long_result, short_result, lines


def test_tau_positive_serves_and_logs_density_below_one(sparse_run):
    long_result, short_result, lines = sparse_run
    assert len(long_result["output_ids"]) == 8 and len(short_result["output_ids"]) == 8
    long_lines = [line for line in lines if line[0] == long_result["meta_info"]["id"]]
    assert [line[1] for line in long_lines] == [64, 128, 192, 256]
    densities = [line[3] for line in long_lines]
    assert all("tau=0.5" in line[4] for line in long_lines)
    assert min(densities) < 1.0, f"tau=0.5 should skip ranked blocks of a 256-token prompt: {densities}"
    (short_line,) = [line for line in lines if line[0] == short_result["meta_info"]["id"]]
    assert short_line[3] == 1.0 and "dense (kv_len < --s2o-min-length 64)" in short_line[4]
