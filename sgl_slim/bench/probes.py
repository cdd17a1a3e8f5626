"""Server-side state read over HTTP and from the OS, for load runs: KV pool tokens in use (SGLang's
``/v1/loads``: tokens held by running requests, excluding the evictable radix cache) and resident memory of
the server's process tree."""

from __future__ import annotations

import time
from urllib.parse import urlparse


def server_load(base_url: str) -> dict:
    """Sum over data-parallel ranks of SGLang's /v1/loads core fields."""
    import requests  # noqa: PLC0415

    r = requests.get(base_url.rstrip("/") + "/v1/loads", params={"include": "core"}, timeout=30)
    r.raise_for_status()
    loads = r.json()["loads"]
    keys = ("num_used_tokens", "num_running_reqs", "num_waiting_reqs", "max_total_num_tokens")
    return {k: sum(int(load.get(k) or 0) for load in loads) for k in keys}


def wait_until_idle(base_url: str, timeout_s: float = 60.0, poll_s: float = 0.5) -> dict:
    """Poll /v1/loads until no request runs or waits and no KV token is in use; the last reading either way."""
    deadline = time.time() + timeout_s
    while True:
        load = server_load(base_url)
        idle = load["num_used_tokens"] == 0 and load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0
        if idle or time.time() > deadline:
            return load
        time.sleep(poll_s)


def server_rss_bytes(base_url: str) -> int:
    """Resident memory of the process listening on the URL's port plus all its descendants (SGLang's
    scheduler, detokenizer and any workers). 0 if no listening process is found."""
    import psutil  # noqa: PLC0415

    port = urlparse(base_url).port
    pids = {c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total
