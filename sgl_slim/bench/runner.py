"""Send a workload to an OpenAI-compatible SGLang server (streaming chat completions through the openai
client), with a concurrency cap and an optional Poisson arrival rate; and launch/stop a server for a run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sgl_slim.bench.stats import RequestResult
from sgl_slim.bench.workload import BenchRequest


async def _one(client, req: BenchRequest, model: str, extra: dict) -> RequestResult:
    res = RequestResult(kind=req.kind)
    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=req.messages, max_tokens=req.max_tokens, stream=True,
            stream_options={"include_usage": True}, **extra)
        parts = []
        async for chunk in stream:
            now = time.perf_counter() - t0
            if chunk.usage is not None:
                res.prompt_tokens = chunk.usage.prompt_tokens
                res.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    if not res.chunk_times_s:
                        res.ttft_s = now
                    res.chunk_times_s.append(now)
                    parts.append(choice.delta.content)
                if choice.finish_reason is not None:
                    res.finish_reason = choice.finish_reason
        res.latency_s = time.perf_counter() - t0
        res.text = "".join(parts)
        if res.finish_reason is None:
            res.error = "stream ended without a finish_reason"
        elif not res.chunk_times_s:
            res.error = "no content streamed"
        elif res.completion_tokens < 1:
            res.error = "no usage report (completion_tokens) in the stream"
        else:
            res.ok = True
    except Exception as exc:  # noqa: BLE001 (every failure is recorded per request, with its message)
        res.latency_s = time.perf_counter() - t0
        res.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return res


async def run_workload(base_url: str, requests: list[BenchRequest], *, concurrency: int = 8,
                       request_rate: float = float("inf"), seed: int = 0, model: str = "default",
                       temperature: float = 0.0, ignore_eos: bool = True, progress: bool = True,
                       timeout_s: float = 600.0) -> tuple[list[RequestResult], float]:
    """Results in the order of ``requests`` and the wall time of the run (s). Requests start at Poisson
    arrival times of rate ``request_rate`` (req/s; inf = all at once), at most ``concurrency`` in flight.
    ``ignore_eos`` (SGLang's extra body field) makes every request generate exactly ``max_tokens``."""
    import openai  # noqa: PLC0415

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf = no pacing), got {request_rate}")
    client = openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="none", timeout=timeout_s,
                                max_retries=0)
    extra = {"temperature": temperature, "extra_body": {"ignore_eos": ignore_eos}}
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(total=len(requests), desc="requests", unit="req", file=sys.stderr)

    async def limited(req):
        async with sem:
            res = await _one(client, req, model, extra)
        if bar is not None:
            bar.update(1)
        return res

    tasks = []
    t0 = time.perf_counter()
    for req in requests:
        tasks.append(asyncio.create_task(limited(req)))
        if request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    await client.close()
    return list(results), duration


def free_port(start: int = 0) -> int:
    """``start`` if it can be bound on 127.0.0.1 (or the next free one above it); any free port for 0."""
    port = start
    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                if port == 0 or port >= 65535:
                    raise
                port += 1


# What SGLang (or uvicorn under it) logs when a port it binds is taken: the server port, or one it derives.
PORT_TAKEN = re.compile(r"address already in use|port is already in use|port\w* at \d+ is not available", re.I)


class LaunchedServer:
    """A server in its own process group, stopped with it: ``python -m sgl_slim.launch ARGS --host 127.0.0.1
    --port P``, or with ``plain=True`` stock ``python -m sglang.launch_server ARGS`` with sgl_slim's plugin
    excluded (the baseline of comparisons; demo names are resolved and, without CUDA, the same CPU set-up as
    the launcher's is applied; on a GPU host without sgl_kernel's compiled library, the launcher's GPU
    stand-ins, sgl_slim/standins/gpu.py).

    The port is free when chosen, but another process may bind it before the server does: a server that exits
    while starting because a port was taken (:data:`PORT_TAKEN` in its log) is started again, once, on a new
    free port (``port`` and ``base_url`` follow)."""

    def __init__(self, args: str | list[str], port: int = 0, log_path: str | Path | None = None, *,
                 plain: bool = False, env: dict | None = None):
        self.args = shlex.split(args) if isinstance(args, str) else list(args)
        self.port = free_port(port)
        self.plain = plain
        self.env = dict(os.environ, **(env or {}))
        self.log_path = Path(log_path) if log_path is not None else \
            Path(tempfile.mkstemp(prefix=f"sgl_slim_srv{self.port}_", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.port_retried = False          # started again on a new port after a port was taken
        self._log_head = ""                # written at the top of the log before the server's own output

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The command line; in plain mode, also prepares ``self.env`` (SGLang reads it at import time)."""
        common = ["--host", "127.0.0.1", "--port", str(self.port)]
        if not self.plain:
            return [sys.executable, "-m", "sgl_slim.launch", *self.args, *common]
        from sgl_slim import launch  # noqa: PLC0415
        from sgl_slim.standins import gpu as gpu_standins  # noqa: PLC0415

        args = launch.resolve_model(self.args)
        self.env["SGLANG_PLUGINS"] = "none-but-sglang"    # an allow-list naming no plugin: plain SGLang
        if not launch.cuda_available():
            launch.enable_cpu_mode(self.env)
            args = launch.apply_cpu_defaults(args)
        elif gpu_standins.compiled_sgl_kernel_missing():
            # a GPU host without sgl_kernel's library: the launcher's stand-ins, and of sgl_slim's plugins only the
            # one that guards SGLang's dual GEMM against the missing cutlass (it changes no output)
            gpu_standins.enable_gpu_standins(self.env)
            self.env["SGLANG_PLUGINS"] = gpu_standins.PLUGIN_NAME
            args = gpu_standins.apply_gpu_defaults(args)
        return [sys.executable, "-m", "sglang.launch_server", *args, *common]

    def start(self) -> "LaunchedServer":
        cmd = self.command()
        with self.log_path.open("w") as log:
            log.write(self._log_head)
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout: float | None = None) -> "LaunchedServer":
        import requests  # noqa: PLC0415

        if timeout is None:
            timeout = float(os.environ.get("SGL_SLIM_BENCH_STARTUP_TIMEOUT", "900"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if not self.port_retried and PORT_TAKEN.search(self.log()):
                    self._restart_on_new_port()
                    continue
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server `{shlex.join(self.proc.args)}` exited with {self.proc.returncode}:\n"
                                   f"{tail}")
            try:
                if requests.get(self.base_url + "/health_generate", timeout=30).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"server `{shlex.join(self.proc.args)}` not ready after {timeout:.0f} s; log "
                           f"{self.log_path}:\n{self.log()[-3000:]}")

    def _restart_on_new_port(self) -> None:
        taken, first_log = self.port, self.log()
        self.port_retried = True
        self.port = free_port(0)
        self._log_head = (f"[sgl_slim.bench] a port was taken while the server started on port {taken}; started "
                          f"again on port {self.port}. The first attempt's log:\n{first_log}"
                          f"[sgl_slim.bench] end of the first attempt's log\n")
        self.start()

    def __enter__(self) -> "LaunchedServer":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 30 s; never raises (a teardown must not fail because
        a loaded machine is slow to reap the server)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=30)
                return
            except subprocess.TimeoutExpired:
                continue

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def running(servers: dict):
    """Start every server of ``servers`` ({name: LaunchedServer}; their start-ups overlap), wait until each is
    ready and yield the dict; every server is stopped on the way out, whatever happened."""
    try:
        for srv in servers.values():
            srv.start()
        for srv in servers.values():
            srv.wait_ready()
        yield servers
    finally:
        for srv in servers.values():
            srv.stop()
