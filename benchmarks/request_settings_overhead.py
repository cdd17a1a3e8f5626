"""What per-request settings cost a request that carries none: the hooks' own work, timed in-process, beside the
time of the cheapest real request on the CPU demo server.

    python -m benchmarks.request_settings_overhead --out benchmarks/results/request_settings_overhead.jsonl

A server started by ``sgl_slim.launch`` runs four hooks for every request (sgl_slim/integration/request_hooks.py):
the HTTP entry reads the body's ``sgl_slim`` field (Starlette parsed the JSON already), ``generate_request``
looks for settings in each sampling-params dict and wraps the output stream, and the scheduler's queue hook
looks in ``custom_params``. Each is timed here on a real Starlette request and a real ``GenerateReqInput`` /
scheduler ``Req`` stand-in, without the object and with one (for contrast), median of many calls. Then one
server answers 1-token text requests (its own median), the smallest request there is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import types

from benchmarks.harness import env_info, markdown_table, record, write_results

CALLS = 2000


def starlette_request(body: dict):
    """A Starlette request whose JSON body was already read once (as SGLang's endpoints do)."""
    from starlette.requests import Request

    raw = json.dumps(body).encode()
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/generate", "headers": [], "query_string": b""},
                      receive)
    asyncio.run(request.json())
    return request


def hook_cost_us(settings: dict | None, chunks: int) -> dict:
    """Median microseconds per request of each hook, for a request with ``settings`` (None: no object)."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    from sgl_slim.config import IDPrunerConfig, SlimConfig
    from sgl_slim.integration import request_hooks as hooks

    hooks._CFG = SlimConfig(idpruner=IDPrunerConfig(enabled=True))
    body = {"text": "Hello there, how are you today?", "sampling_params": {"max_new_tokens": 16}}
    if settings is not None:
        body["sgl_slim"] = settings
    request = starlette_request(body)

    async def original_stream(self, obj, request):
        for i in range(chunks):
            yield i

    async def entry():
        assert await hooks._object_error(request) is None

    async def generate():
        obj = GenerateReqInput(text=body["text"], sampling_params=dict(body["sampling_params"]))
        async for _ in hooks._generate_request_around(original_stream, None, obj, request):
            pass

    async def plain_stream():
        async for _ in original_stream(None, None, None):
            pass

    req = types.SimpleNamespace(rid="r", sampling_params=types.SimpleNamespace(
        custom_params={hooks.CARRIER_KEY: settings} if settings else None))

    def timed(fn, is_async: bool) -> float:
        samples = []
        for _ in range(CALLS):
            t0 = time.perf_counter()
            asyncio.run(fn()) if is_async else fn()
            samples.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(samples)

    # asyncio.run's own cost is in every async sample: subtract an empty coroutine's
    async def nothing():
        pass

    loop_us = timed(nothing, True)
    out = {"entry_us": timed(entry, True) - loop_us,
           "generate_us": timed(generate, True) - timed(plain_stream, True),
           "queue_us": timed(lambda: hooks._add_request_to_queue_before(None, req), False)}
    hooks.SCHEDULED.pop("r")
    out["total_us"] = sum(out.values())
    return out


def smallest_request_ms(requests_n: int) -> float:
    """Median latency of a 1-token text /generate on the CPU demo server started by sgl_slim.launch."""
    import requests

    from sgl_slim.bench.runner import LaunchedServer

    srv = LaunchedServer(["--model", "demo", "--dtype", "float32", "--max-total-tokens", "8192"])
    try:
        srv.start()
        srv.wait_ready()
        body = {"text": "Hello there, how are you today?", "sampling_params": {"max_new_tokens": 1,
                                                                               "temperature": 0}}
        samples = []
        for i in range(requests_n + 2):
            t0 = time.perf_counter()
            r = requests.post(srv.base_url + "/generate", json=body, timeout=120)
            r.raise_for_status()
            if i >= 2:                                   # two warm-up requests
                samples.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(samples)
    finally:
        srv.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=16, help="streamed outputs per request (the wrapper's cost)")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = [record("request_settings_hooks", carries="nothing", chunks=args.chunks, **hook_cost_us(None, args.chunks)),
            record("request_settings_hooks", carries="an object", chunks=args.chunks,
                   **hook_cost_us({"idpruner_keep_ratio": 0.5}, args.chunks))]
    request_ms = smallest_request_ms(args.requests)
    for row in rows:
        row["smallest_request_ms"] = request_ms
        row["share_of_smallest_request"] = row["total_us"] / (1e3 * request_ms)
    write_results(args.out, rows, env=env_info())
    print(markdown_table(rows, ["carries", "entry_us", "generate_us", "queue_us", "total_us", "smallest_request_ms",
                                "share_of_smallest_request"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
