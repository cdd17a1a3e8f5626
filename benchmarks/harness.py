"""One harness for every benchmark: timing (warm-up, median of many), environment and git SHA,
results as JSON lines, and a plot helper.

Usage:
    from benchmarks.harness import time_ms, record, write_results
    t = time_ms(lambda: fn(x), warmup=3, iters=20)        # median milliseconds
    rows.append(record("s2o", length=8192, ms=t, rel_l2=err, density=d))
    write_results("benchmarks/results/s2o_speed.jsonl", rows)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch


def git_sha() -> str:
    try:
        # "-dirty" when the working tree differs from the commit (the code that ran is not that commit's)
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info() -> dict:
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton  # noqa: PLC0415 (optional)
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def time_ms(fn: Callable[[], object], *, warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of ``fn`` in milliseconds; CUDA work is timed with events."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def record(name: str, **fields) -> dict:
    return {"bench": name, **fields}


def write_results(path: str | os.PathLike, rows: list[dict], *, env: dict | None = None) -> Path:
    """Write rows as JSON lines; the first line is the environment (``{"env": {...}}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(json.dumps({"env": env or env_info()}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_results(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return lines[0]["env"], lines[1:]


def markdown_table(rows: list[dict], columns: list[str], *, floatfmt: str = ".4g") -> str:
    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


# (name, from, to): a request's meta_info timestamps (wall clock, seconds) from SGLang's request time stats, which a
# server started with --enable-metrics returns: received -> handed to the scheduler (decoding, processors, hooks),
# -> its forward pass starts (transfer, queueing), -> its prefill ends (every chunk's forward)
REQUEST_PHASES = (("preprocess_s", "request_received_ts", "api_server_dispatch_finish_ts"),
                  ("to_forward_s", "api_server_dispatch_finish_ts", "forward_entry_time"),
                  ("prefill_s", "forward_entry_time", "prefill_finished_time"))


def request_phases(meta: dict) -> dict:
    """A request's ``REQUEST_PHASES`` in seconds, where its meta_info has both timestamps."""
    return {name: round(meta[b] - meta[a], 4) for name, a, b in REQUEST_PHASES
            if isinstance(meta.get(a), (int, float)) and isinstance(meta.get(b), (int, float))}


def stream_generate(base_url: str, body: dict, timeout_s: float = 600.0) -> tuple[float | None, float, dict | None]:
    """One streaming ``/generate`` request (``body`` with ``"stream": True``): (time to the first streamed chunk,
    total latency, the last chunk) in seconds; ttft / chunk None when nothing was streamed.  HTTP and network
    errors propagate."""
    req = urllib.request.Request(base_url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, last = None, None
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            last = json.loads(line[5:])
    return ttft, time.perf_counter() - t0, last


def wave_image(seed: int, size: int, fmt: str = "PNG") -> bytes:
    """A seeded square RGB image, encoded as ``fmt``: smooth colour waves plus noise (neighbouring vision tokens
    are alike, as in photos; the content is irrelevant to random weights)."""
    import io  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(7 * x + seed), np.cos(5 * y - seed), np.sin(3 * (x + y) + seed)], axis=-1)
    arr = ((base * 0.5 + 0.5) * 200 + rng.random((size, size, 3)) * 55).clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()
