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
from pathlib import Path

from sgl_slim.bench.runner import LaunchedServer

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = float(os.environ.get("SGL_SLIM_TEST_STARTUP_TIMEOUT", "600"))


class SlimServer(LaunchedServer):
    """:class:`sgl_slim.bench.runner.LaunchedServer` with what tests ask of a server: ``python -m
    sgl_slim.launch ARGS`` (or stock ``sglang.launch_server`` with ``plain=True``, no plugin) on ``port``."""

    def __init__(self, args: list[str], *, port: int, plain: bool = False, env: dict | None = None):
        super().__init__(args, port, plain=plain, env=env)
        self.port = port   # exactly this port (LaunchedServer would move to a free one): tests may attach to
        #                    a server already running there (SGL_SLIM_SERVE_PORTS in tests/serve/conftest.py)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> "SlimServer":
        return super().wait_ready(timeout)

    def registered_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"sgl_slim: registered in process (\d+)", self.log())]

    def openai(self):
        import openai  # noqa: PLC0415
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", timeout=300, max_retries=0)


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
