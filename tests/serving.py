"""Start and stop real SGLang servers for end-to-end tests (CPU), and build media inputs.

    with SlimServer(["--model", "demo", "--dtype", "float32"], port=30100) as srv:
        client = srv.openai()
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
SHIM_DIR = ROOT / "sgl_slim" / "_cpu_shim"
STARTUP_TIMEOUT_S = float(os.environ.get("SGL_SLIM_TEST_STARTUP_TIMEOUT", "600"))


class SlimServer:
    """A server process group: ``python -m sgl_slim.launch ARGS`` (or plain ``sglang.launch_server`` with
    ``plain=True``, sgl_slim's plugin excluded), stopped with its whole process group."""

    def __init__(self, args: list[str], *, port: int, plain: bool = False, env: dict | None = None):
        self.args, self.port, self.plain = list(args), port, plain
        self.env = dict(os.environ, **(env or {}))
        self.log_path = Path(tempfile.mkstemp(prefix=f"sgl_slim_srv{port}_", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "SlimServer":
        common = ["--port", str(self.port), "--host", "127.0.0.1"]
        if self.plain:
            from sgl_slim.demo import ensure_demo  # noqa: PLC0415
            args = [str(ensure_demo(a)) if a in ("demo", "demo-audio") else a for a in self.args]
            cmd = [sys.executable, "-m", "sglang.launch_server", "--device", "cpu", *common, *args]
            self.env.update(SGLANG_USE_CPU_ENGINE="1", TORCH_COMPILE_DISABLE="1",
                            SGLANG_PLUGINS="none-but-sglang",  # loads no plugin at all: plain SGLang
                            PYTHONPATH=os.pathsep.join([str(SHIM_DIR), self.env.get("PYTHONPATH", "")]))
            if "--max-total-tokens" not in args:
                cmd += ["--max-total-tokens", "65536"]
        else:
            cmd = [sys.executable, "-m", "sgl_slim.launch", *common, *self.args]
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> "SlimServer":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(f"{self.base_url}/health_generate", timeout=30).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def registered_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"sgl_slim: registered in process (\d+)", self.log())]

    def openai(self):
        import openai  # noqa: PLC0415
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", timeout=300, max_retries=0)

    def __enter__(self) -> "SlimServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


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
