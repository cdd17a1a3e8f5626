"""Real SGLang servers for end-to-end tests (CPU): one factory, shared across the whole session; media inputs.

A test module declares the servers it needs as fixtures, by their flags:

    from serving import shared_server

    vl_server = shared_server(["--model", "demo", "--dtype", "float32", "--idpruner"])
    plain_vl = shared_server(["--model-path", "demo", "--dtype", "float32"], plain=True)   # stock SGLang
    scaled = shared_server(params={"tp": [..., "--tp-size", "2"], "dp": [..., "--dp-size", "2"]})  # -> (key, srv)

    def test_something(vl_server):
        client = vl_server.openai()

The pool behind them (``server_pool``, tests/conftest.py) keys servers by (flags, plain, env): fixtures with
equal flags, in any module, share ONE server. Before the run it reads which test needs which server; a server
starts when the first test that needs it is set up (with the next test's servers started alongside when that
overlaps the load with the current test of the same file, at most ``SGL_SLIM_TEST_MAX_SERVERS`` alive, default
2), and stops as soon as the last test that needs it has finished. ``SGL_SLIM_TEST_ATTACH=name=port[:log],...``
attaches the fixture ``name`` to a server already running with the same flags (developing a test) instead.

A module-scoped fixture of its own may use a pooled server too (declare the server with ``shared_server`` and
request it from the fixture: the pool sees the dependency). For instance a module that compares a dense server
with an S2O one and reads S2O's log lines (tests/attention/test_s2o_e2e.py manages its servers itself today):

    dense = shared_server(COMMON)
    sparse = shared_server([*COMMON, "--s2o", "--s2o-tau", "0", "--s2o-min-length", "0"])

    @pytest.fixture(scope="module")
    def tau0_runs(dense, sparse):          # both started together, stopped after the module's last user
        return {"dense": workload(dense), "s2o": workload(sparse)}, LOG_LINE.findall(sparse.log())

(``srv.base_url``, ``srv.log()`` the server's whole output so far, ``srv.proc`` its process, ``srv.openai()``). Code that manages a server's whole life itself
(a server that must fail to start, a one-off) uses :class:`SlimServer` directly as a context manager:

    with SlimServer(["--model", "demo", "--dtype", "float32"], port=0) as srv: ...
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from sgl_slim.bench.runner import LaunchedServer, free_port

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = float(os.environ.get("SGL_SLIM_TEST_STARTUP_TIMEOUT", "900"))
MAX_SERVERS = int(os.environ.get("SGL_SLIM_TEST_MAX_SERVERS", "2"))


class SlimServer(LaunchedServer):
    """:class:`sgl_slim.bench.runner.LaunchedServer` with what tests ask of a server: ``python -m
    sgl_slim.launch ARGS`` (or stock ``sglang.launch_server`` with ``plain=True``, no plugin) on ``port``
    (0: a free one), ready when ``/health_generate`` answers 200 (a real generation ran)."""

    def __init__(self, args: list[str], *, port: int, plain: bool = False, env: dict | None = None):
        super().__init__(args, port, plain=plain, env=env)
        if port:
            self.port = port   # exactly this port (LaunchedServer would move to a free one): attaching

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> "SlimServer":
        if getattr(self, "_ready", False) and self.proc is not None and self.proc.poll() is None:
            return self    # ready once and still running: no second health generation
        super().wait_ready(timeout)
        self._ready = True
        return self

    def registered_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"sgl_slim: registered in process (\d+)", self.log())]

    def openai(self):
        import openai  # noqa: PLC0415
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", timeout=300, max_retries=0)


@dataclass(frozen=True)
class ServerSpec:
    """What makes two servers interchangeable: the launcher's flags, stock or sgl_slim, extra environment.
    An argument may name a model built on first use (a key of :data:`MODEL_DIRS`, e.g. ``{eagle_target}``):
    it is built when the server starts, not when tests are collected."""
    args: tuple[str, ...]
    plain: bool = False
    env: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        return ("stock sglang " if self.plain else "sgl_slim ") + " ".join(self.args)


def server_spec(args: list[str], *, plain: bool = False, env: dict | None = None) -> ServerSpec:
    return ServerSpec(tuple(str(a) for a in args), plain, tuple(sorted((env or {}).items())))


def _eagle_target() -> Path:
    from sgl_slim.spec.target_lm import ensure_eagle_target  # noqa: PLC0415
    return ensure_eagle_target()


def _eagle_draft() -> Path:
    from sgl_slim.spec.train import ensure_eagle_draft  # noqa: PLC0415
    return ensure_eagle_draft()


# model directories built on first use, named in a server's flags by these keys (a test module may add its own)
MODEL_DIRS = {"{eagle_target}": _eagle_target, "{eagle_draft}": _eagle_draft}


def cached_build(out: Path, build) -> Path:
    """``out``, built by ``build(folder)`` on first use: in a private folder, marked complete, then renamed, so
    concurrent test runs never read a half-written model. ``build`` writes ``folder/.complete`` last."""
    import shutil  # noqa: PLC0415

    if not (out / ".complete").is_file():
        work = build(out.with_name(f"{out.name}.partial{os.getpid()}"))
        if out.is_dir() and not (out / ".complete").is_file():
            shutil.rmtree(out, ignore_errors=True)        # left by an interrupted run
        try:
            os.replace(work, out)
        except OSError:                                   # another run finished first
            shutil.rmtree(work, ignore_errors=True)
    return out


class ServerPool:
    """The session's servers, one per :class:`ServerSpec`, with the plan of which test needs which."""

    def __init__(self, max_alive: int = MAX_SERVERS):
        self.max_alive = max_alive
        self.live: dict[ServerSpec, SlimServer] = {}
        self.attached: dict[ServerSpec, SlimServer] = {}
        self.needs: list[tuple[str, set[ServerSpec]]] = []    # per test in run order: (module, specs)
        self.last_use: dict[ServerSpec, int] = {}
        self.position: dict[str, int] = {}                   # test nodeid -> index in self.needs
        self.started: list[ServerSpec] = []                  # every start, in order (model loads)

    # -- the plan (pytest_collection_finish) --------------------------------------------------------------
    def plan(self, items) -> None:
        self.needs, self.last_use, self.position = [], {}, {}
        attach = _attach_env()
        for i, item in enumerate(items):
            named = specs_of(item, named=True)
            specs = {spec for label, spec in named if label not in attach}    # attached ones are never started
            self.needs.append((item.nodeid.split("::")[0], specs))
            self.position[item.nodeid] = i
            for spec in specs:
                self.last_use[spec] = i

    # -- per test (pytest_runtest_setup / _teardown) ------------------------------------------------------
    def before(self, nodeid: str) -> None:
        """Start this test's servers (together), plus the next test's if that overlaps a load with this file's
        tests without going over ``max_alive``; then wait for this test's."""
        i = self.position.get(nodeid)
        if i is None:
            return
        module, mine = self.needs[i]
        self._start([s for s in mine if s not in self.live and s not in self.attached])
        for spec in self._prefetch(i, module):
            self._start([spec])
        for spec in mine:
            if spec in self.live:
                self.live[spec].wait_ready()

    def _prefetch(self, i: int, module: str) -> list[ServerSpec]:
        for j in range(i + 1, len(self.needs)):
            nxt_module, specs = self.needs[j]
            missing = [s for s in specs if s not in self.live and s not in self.attached]
            if not missing:
                continue
            if (nxt_module == module or j == i + 1) and len(self.live) + len(missing) <= self.max_alive:
                return missing
            return []
        return []

    def after(self, nodeid: str) -> None:
        """Stop every server no later test needs."""
        i = self.position.get(nodeid)
        if i is None:
            return
        for spec in [s for s in self.live if self.last_use.get(s, -1) <= i]:
            self.live.pop(spec).stop()

    def _start(self, specs: list[ServerSpec]) -> None:
        for spec in specs:
            args = [str(MODEL_DIRS[a]()) if a in MODEL_DIRS else a for a in spec.args]
            srv = SlimServer(args, port=0, plain=spec.plain, env=dict(spec.env))
            self.live[spec] = srv.start()
            self.started.append(spec)

    # -- what fixtures call -------------------------------------------------------------------------------
    def get(self, spec: ServerSpec, name: str) -> SlimServer:
        attach = _attach_env()
        if name in attach:
            if spec not in self.attached:
                import requests  # noqa: PLC0415
                port, _, log = attach[name].partition(":")
                srv = SlimServer(list(spec.args), port=int(port), plain=spec.plain)
                if log:
                    srv.log_path = Path(log)
                health = requests.get(f"{srv.base_url}/health_generate", timeout=120)
                assert health.status_code == 200, f"SGL_SLIM_TEST_ATTACH {name}: {srv.base_url} is not healthy"
                self.attached[spec] = srv
            return self.attached[spec]
        if spec not in self.live:      # a test the plan did not see (e.g. a fixture requested dynamically)
            self._start([spec])
        return self.live[spec].wait_ready()

    def stop_all(self) -> None:
        while self.live:
            self.live.popitem()[1].stop()


# The demo servers most serving tests share (tests/serve/conftest.py): IDPruner on the image demo, Samp on the
# audio demo, a small context so over-long prompts are cheap to send.
CONTEXT_LENGTH = 1024
SERVE_COMMON = ["--dtype", "float32", "--max-total-tokens", "8192", "--context-length", str(CONTEXT_LENGTH)]
VL_ARGS = ["--model", "demo", *SERVE_COMMON, "--idpruner", "--idpruner-keep-ratio", "0.25"]
AUDIO_ARGS = ["--model", "demo-audio", *SERVE_COMMON, "--samp"]

SPECS_ATTR = "_sgl_slim_server_specs"


def _attach_env() -> dict[str, str]:
    """SGL_SLIM_TEST_ATTACH: {fixture label: "port[:log]"}."""
    return dict(kv.split("=", 1) for kv in os.environ.get("SGL_SLIM_TEST_ATTACH", "").split(",") if kv)


def specs_of(item, named: bool = False) -> list:
    """The pooled servers a collected test needs, through any chain of fixtures; with ``named``, as
    (fixture label, spec) pairs (the label of a parametrized one is ``name[key]``)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    out = []
    for name in item.fixturenames:
        defs = info.name2fixturedefs.get(name)
        if not defs:
            continue
        specs = getattr(defs[-1].func, SPECS_ATTR, None)
        if specs is None:
            continue
        if None in specs:
            out.append((name, specs[None]))
        else:
            key = getattr(item, "callspec", None) and item.callspec.params.get(name)
            keys = [key] if key in specs else list(specs)
            out.extend((f"{name}[{k}]", specs[k]) for k in keys)
    return out if named else [spec for _, spec in out]


def shared_server(args: list[str] | None = None, *, plain: bool = False, env: dict | None = None,
                  params: dict[str, list[str]] | None = None):
    """A session-scoped fixture giving the pool's server for ``args`` (see the module doc). With ``params``
    ({key: args}), a parametrized fixture giving ``(key, server)`` for each."""
    if (args is None) == (params is None):
        raise ValueError("shared_server takes either args or params")
    specs = {None: server_spec(args, plain=plain, env=env)} if params is None else \
        {key: server_spec(a, plain=plain, env=env) for key, a in params.items()}

    def fixture(request, server_pool):
        if params is None:
            return server_pool.get(specs[None], request.fixturename)
        return request.param, server_pool.get(specs[request.param], f"{request.fixturename}[{request.param}]")

    setattr(fixture, SPECS_ATTR, specs)
    return pytest.fixture(scope="session", params=list(params) if params else None)(fixture)


def png_data_url(width: int = 224, height: int = 224, seed: int = 0) -> str:
    """A deterministic test image (smooth gradients plus a few shapes) as a PNG data URL."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    img = Image.new("RGB", (width, height))
    px = img.load()
    for y in range(height):
        for x in range(width):
            px[x, y] = ((x * 255 // max(1, width - 1) + seed * 37) % 256, (y * 255 // max(1, height - 1)) % 256,
                        (x * y + seed * 91) % 256)
    draw = ImageDraw.Draw(img)
    for i in range(3):
        x0, y0 = (seed * 53 + i * 61) % max(1, width), (seed * 29 + i * 47) % max(1, height)
        draw.rectangle([x0, y0, x0 + width // 5, y0 + height // 6], fill=((i * 80) % 256, 200, 30 * i))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_data_url(seconds: float = 1.0, rate: int = 16000, freq: float = 440.0, seed: int = 0) -> str:
    """A deterministic test clip (two tones and a chirp) as a 16-bit WAV data URL."""
    import numpy as np  # noqa: PLC0415
    import soundfile as sf  # noqa: PLC0415

    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * math.pi * freq * t) + 0.2 * np.sin(2 * math.pi * (freq * 1.5 + 50 * seed) * t)
    wave += 0.1 * np.sin(2 * math.pi * (200 + 400 * t) * t)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, url: str | None) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def audio_message(text: str, url: str | None) -> list[dict]:
    parts = ([{"type": "audio_url", "audio_url": {"url": url}}] if url else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def greedy(client, messages, max_tokens: int = 12, **extra):
    return client.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens,
                                          temperature=0, **extra)
