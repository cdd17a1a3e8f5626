"""End to end on the CPU demo server (image model, float32: rounding cannot flip a greedy token).

* ``--s2o --s2o-tau 0`` gives exactly the greedy tokens of the same server without ``--s2o`` (32 tokens each):
  text and image prompts, a chunked prompt, a radix-cache hit, a batch of several requests in one prefill,
  concurrent clients; every prefill ran on the stock backend (its log line and ``meta_info`` say dense);
* ``--s2o --s2o-tau 0.5 --s2o-min-length 100``: every prompt shorter than 100 tokens gives exactly the stock
  server's tokens; a 256-token prompt is served sparse (density below 1) once its chunks reach 100 tokens.
* the default variant (v4: planned budget + audit) with ``--s2o-tau 0.3``: a 1,600-token prompt, whose later
  segments reach past the 1,024-key window, is served sparse in chunks of 512; a short prompt gives the stock
  server's tokens.

Four servers, two at a time at most (the stock and tau-0 servers together, then the min-length and v4 ones), each in
its own process group, killed after; the stock server's answers are the reference for both.
"""

from __future__ import annotations

import base64
import io
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
MAX_NEW = 32               # the divergence this guards against showed at about the 25th token
S2O_SMALL = ["--s2o-block-size", "16", "--s2o-segment-size", "32",   # short prompts still have a prefix
             "--s2o-variant", "v1"]                                  # (v2 visits 1024 keys before a segment: all of them)
LOG_LINE = re.compile(r"S2O prefill rid=(\S+) kv_len=(\d+) new=(\d+) density=([0-9.]+) (.*)")


_TAKEN: set[int] = set()


def _free_port(lo: int = 32000, hi: int = 32999) -> int:
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
    raise RuntimeError("no free port in 32000-32999")


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

    def generate(self, input_ids=None, *, text=None, images=(), max_new_tokens: int = MAX_NEW):
        body = {"sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}
        if text is not None:
            body["text"] = text
        else:
            body["input_ids"] = input_ids
        if images:
            body["image_data"] = [base64.b64encode(im).decode() for im in images]
        body = json.dumps(body).encode()
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


def _image(width: int, height: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
LONG = _ids(150, 1)                       # chunked: 150 tokens through --chunked-prefill-size 64
RADIX = LONG[:96] + _ids(21, 2)           # shares 96 tokens with LONG -> radix-cache hit
BATCH = [_ids(n, 10 + n) for n in (9, 13, 17, 20)]   # 59 tokens: one prefill batch of four
SHORT = _ids(5, 3)
IMAGE_PROMPTS = {                         # name -> (text, [(width, height, seed)]); all below 100 tokens
    "img_one": (f"<|im_start|>user\n{IMAGE}What is in the picture?<|im_end|>\n<|im_start|>assistant\n",
                [(112, 112, 1)]),
    "img_wide": (f"<|im_start|>user\n{IMAGE}Describe it.<|im_end|>\n<|im_start|>assistant\n", [(168, 84, 2)]),
    "img_two": (f"<|im_start|>user\nFirst {IMAGE} then {IMAGE} compare.<|im_end|>\n<|im_start|>assistant\n",
                [(84, 84, 3), (112, 56, 4)]),
    "img_tall": (f"<|im_start|>user\n{IMAGE}Count the colours.<|im_end|>\n<|im_start|>assistant\n",
                 [(56, 140, 5)]),
}
SPARSE_MIN_LENGTH = 100
LONG_SPARSE = _ids(256, 7)                # chunks of 64: kv 64 (dense), 128, 192, 256 (sparse)
LONG_V4 = _ids(1600, 8)                   # chunks of 512: kv 512, 1024, 1536, 1600
V4 = ["--s2o", "--s2o-tau", "0.3", "--s2o-min-length", "100", "--s2o-block-size", "64", "--s2o-segment-size", "128",
      "--chunked-prefill-size", "512"]    # no --s2o-variant: the default


def _workload(server: Server) -> dict:
    """The same request sequence on every server (order matters for the radix cache)."""
    out = {"long": server.generate(LONG), "radix": server.generate(RADIX), "batch": server.generate(BATCH)}
    for name, (text, images) in IMAGE_PROMPTS.items():
        out[name] = server.generate(text=text, images=[_image(*spec) for spec in images])
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
def runs(tmp_path_factory):
    """{server: (workload results, S2O log lines)}; the min-length server also answers LONG_SPARSE."""
    tmp = tmp_path_factory.mktemp("s2o_e2e")
    out = {}
    phases = [{"stock": [], "tau0": ["--s2o", "--s2o-tau", "0", "--s2o-min-length", "0", *S2O_SMALL]},
              {"min_length": ["--s2o", "--s2o-tau", "0.5", "--s2o-min-length", str(SPARSE_MIN_LENGTH),
                              *S2O_SMALL], "v4": V4}]
    for specs in phases:
        servers = _start_all(specs, tmp)
        try:
            for name, server in servers.items():
                if name == "v4":
                    results = {"long_v4": server.generate(LONG_V4), "short": server.generate(SHORT)}
                else:
                    results = _workload(server)
                if name == "min_length":
                    results["long_sparse"] = server.generate(LONG_SPARSE)
                server.check_alive()
                out[name] = (results, server.s2o_lines())
        finally:
            for server in servers.values():
                server.kill()
    assert not out["stock"][1], "the server without --s2o must not log S2O prefills"
    return out


def _flat(results: dict) -> dict[str, dict]:
    flat = {key: results[key] for key in ("long", "radix", *IMAGE_PROMPTS)}
    flat.update({f"batch{i}": r for i, r in enumerate(results["batch"])})
    flat.update({f"concurrent{i}": r for i, r in enumerate(results["concurrent"])})
    return flat


def _assert_same_tokens(results: dict, stock: dict, keys) -> None:
    for key in keys:
        got, want = results[key], stock[key]
        assert len(want["output_ids"]) == MAX_NEW
        assert got["output_ids"] == want["output_ids"], f"{key}: {got['output_ids']} != stock {want['output_ids']}"


def test_tau0_gives_the_stock_servers_greedy_tokens(runs):
    stock, tau0 = _flat(runs["stock"][0]), _flat(runs["tau0"][0])
    _assert_same_tokens(tau0, stock, stock)


def test_tau0_ran_every_prefill_on_the_stock_backend_chunked_and_cached(runs):
    results, lines = runs["tau0"]
    by_rid: dict[str, list] = {}
    for rid, kv_len, new, density, how in lines:
        by_rid.setdefault(rid, []).append((kv_len, new, density, how))
    long_rid = results["long"]["meta_info"]["id"]
    assert [(kv, new) for kv, new, *_ in by_rid[long_rid]] == [(64, 64), (128, 64), (150, 22)], \
        "the 150-token prompt should prefill in chunks of 64"
    radix = results["radix"]["meta_info"]
    assert radix["cached_tokens"] >= 64, f"expected a radix-cache hit, got {radix['cached_tokens']} cached"
    kv_len, new, *_ = by_rid[radix["id"]][0]
    assert kv_len == len(RADIX) and new == len(RADIX) - radix["cached_tokens"]
    for r in [*results["batch"], *(results[k] for k in IMAGE_PROMPTS)]:
        assert r["meta_info"]["id"] in by_rid, "every request's prefill must be logged"
        assert r["meta_info"]["sgl_slim"]["s2o_sparse"] is False and r["meta_info"]["sgl_slim"]["s2o_density"] == 1.0
    assert all(density == 1.0 and how.startswith("dense (--s2o-tau 0)") for *_, density, how in lines)


def test_tau0_batch_shared_one_prefill(runs):
    results, lines = runs["tau0"]
    rids = [r["meta_info"]["id"] for r in results["batch"]]
    positions = [i for i, line in enumerate(lines) if line[0] in rids]
    # the four requests' lines come out of one forward: adjacent in the log, each a whole prompt
    assert positions == list(range(positions[0], positions[0] + 4)), f"batch split over forwards: {positions}"


def test_prompts_below_min_length_give_the_stock_servers_greedy_tokens(runs):
    stock, short = _flat(runs["stock"][0]), _flat(runs["min_length"][0])
    below = [key for key in stock if key not in ("long", "radix")]   # those two reach 100 tokens
    assert len(below) == 11
    for key in below:
        assert short[key]["meta_info"]["prompt_tokens"] < SPARSE_MIN_LENGTH, key
    _assert_same_tokens(short, stock, below)


def test_tau_positive_serves_and_logs_density_below_one(runs):
    results, lines = runs["min_length"]
    long_result = results["long_sparse"]
    assert len(long_result["output_ids"]) == MAX_NEW
    long_lines = [line for line in lines if line[0] == long_result["meta_info"]["id"]]
    assert [line[1] for line in long_lines] == [64, 128, 192, 256]
    assert long_lines[0][3] == 1.0 and "dense (kv_len < --s2o-min-length 100)" in long_lines[0][4]
    assert all("tau=0.5" in line[4] for line in long_lines[1:])
    densities = [line[3] for line in long_lines[1:]]
    assert min(densities) < 1.0, f"tau=0.5 should skip ranked blocks of a 256-token prompt: {densities}"
    assert long_result["meta_info"]["sgl_slim"]["s2o_sparse"] is True
    (short_line,) = [line for line in lines if line[0] == results["concurrent"][0]["meta_info"]["id"]]
    assert short_line[3] == 1.0 and "dense (kv_len < --s2o-min-length 100)" in short_line[4]


def test_default_variant_serves_a_long_prompt_sparse(runs):
    from sgl_slim.attention import DEFAULT_VARIANT
    assert DEFAULT_VARIANT == "v4"
    results, lines = runs["v4"]
    long_result = results["long_v4"]
    assert len(long_result["output_ids"]) == MAX_NEW
    long_lines = [line for line in lines if line[0] == long_result["meta_info"]["id"]]
    assert [line[1] for line in long_lines] == [512, 1024, 1536, 1600]
    assert all("tau=0.3" in line[4] for line in long_lines)
    assert long_lines[-1][3] < 1.0, f"keys past the 1024-key window should be left out at tau 0.3: {long_lines}"
    assert long_result["meta_info"]["sgl_slim"]["s2o_sparse"] is True
    stock = runs["stock"][0]["concurrent"][0]                 # SHORT on the stock server
    assert results["short"]["output_ids"] == stock["output_ids"]
