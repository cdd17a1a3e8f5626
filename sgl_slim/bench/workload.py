"""Seeded, locally generated benchmark inputs: short and long texts, images (PIL), audio clips (numpy +
soundfile), videos (JPEG frames in an AVI container written here), as OpenAI chat requests with data URLs
(nothing is downloaded)."""

from __future__ import annotations

import base64
import io
import math
import random
import struct
from dataclasses import dataclass

SCENARIOS = ("text", "longctx", "image", "video", "audio", "mixed")
MIXED_KINDS = ("text", "image", "audio")  # those the model can take; longctx and video only when asked for by name

_WORDS = ("the of and to in is was for on that with as by at from his her it an were which are this be "
          "model token image audio river mountain city garden window light colour square circle music voice "
          "quiet bright morning evening table paper number system network signal memory kernel cache batch "
          "prefill decode sparse dense block query value vector matrix green blue red yellow small large").split()


@dataclass(frozen=True)
class WorkloadSpec:
    max_tokens: int = 32
    text_words: int = 24          # words in a short text prompt
    longctx_words: int = 1500     # words in a long-context prompt
    image_size: int = 224         # square images, pixels (the demo VLM: (224/28)^2 = 64 tokens)
    images_per_request: int = 1
    audio_seconds: float = 2.0    # 16 kHz clips (the demo audio model: 25 tokens per second)
    video_frames: int = 8         # 224x224 frames at 2 fps (the demo VLM: 144 tokens per 2 frames)


@dataclass(frozen=True)
class BenchRequest:
    kind: str
    messages: list
    max_tokens: int


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def png_data_url(size: int, rng: random.Random) -> str:
    """A seeded RGB image: a gradient background with a few random rectangles and ellipses."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    a, b = rng.randrange(256), rng.randrange(256)
    img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    img = Image.merge("RGB", [img.getchannel(0).point(lambda v, a=a: (v + a) % 256),
                              img.getchannel(1).transpose(Image.Transpose.ROTATE_90),
                              img.getchannel(2).point(lambda v, b=b: (255 - v + b) % 256)])
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        box = [x0, y0, x0 + rng.randrange(8, size // 2 + 9), y0 + rng.randrange(8, size // 2 + 9)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_data_url(seconds: float, rng: random.Random, rate: int = 16000) -> str:
    """A seeded 16-bit mono clip: two tones, a chirp and a little noise."""
    import numpy as np  # noqa: PLC0415
    import soundfile as sf  # noqa: PLC0415

    t = np.arange(int(seconds * rate)) / rate
    f1, f2 = rng.uniform(150, 600), rng.uniform(600, 2000)
    wave = 0.3 * np.sin(2 * math.pi * f1 * t) + 0.15 * np.sin(2 * math.pi * f2 * t)
    wave += 0.1 * np.sin(2 * math.pi * (200 + 300 * t) * t)
    wave += 0.02 * np.random.default_rng(rng.randrange(2**32)).standard_normal(t.shape)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def mjpeg_avi(frames, fps: int) -> bytes:
    """An AVI file of ``frames`` (uint8 arrays [H, W, 3], all one size) as Motion-JPEG at ``fps`` frames per
    second: the RIFF header list, one JPEG chunk per frame and the index, the layout FFmpeg's AVI reader takes."""
    from PIL import Image  # noqa: PLC0415

    def chunk(fourcc: bytes, data: bytes) -> bytes:
        return fourcc + struct.pack("<I", len(data)) + data + b"\0" * (len(data) % 2)

    def chunk_list(kind: bytes, body: bytes) -> bytes:
        return b"LIST" + struct.pack("<I", len(body) + 4) + kind + body

    if not frames:
        raise ValueError("a video needs at least one frame")
    height, width = frames[0].shape[:2]
    jpegs = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    n = len(jpegs)
    # MainAVIHeader: us per frame, max bytes/s, padding, flags (has index), frames, initial frames, streams,
    # buffer size, width, height, 4 reserved
    avih = struct.pack("<10I4I", round(1e6 / fps), 0, 0, 0x10, n, 0, 1, 0, width, height, 0, 0, 0, 0)
    # AVIStreamHeader: type, handler, flags, priority, language, initial frames, scale, rate (fps = rate /
    # scale), start, length, buffer size, quality (-1: default), sample size, frame rectangle
    strh = b"vidsMJPG" + struct.pack("<IHHIIIIIIiI4h", 0, 0, 0, 0, 1, fps, 0, n, 0, -1, 0, 0, 0, width, height)
    # BITMAPINFOHEADER
    strf = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, int.from_bytes(b"MJPG", "little"),
                       width * height * 3, 0, 0, 0, 0)
    header = chunk_list(b"hdrl", chunk(b"avih", avih) + chunk_list(b"strl", chunk(b"strh", strh) +
                                                                 chunk(b"strf", strf)))
    movi, index, offset = [], [], 4              # index offsets count from the 'movi' tag
    for jpeg in jpegs:
        movi.append(chunk(b"00dc", jpeg))
        index.append(b"00dc" + struct.pack("<III", 0x10, offset, len(jpeg)))    # 0x10: a key frame
        offset += len(movi[-1])
    body = b"AVI " + header + chunk_list(b"movi", b"".join(movi)) + chunk(b"idx1", b"".join(index))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def video_frames(num_frames: int, width: int, height: int, rng: random.Random):
    """Seeded frames of a slowly changing scene: a gradient background and a few shapes drifting across it
    (neighbouring frames are alike, as in real video)."""
    import numpy as np  # noqa: PLC0415

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    phase = rng.uniform(0, 6.3)
    shapes = [(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05),
               rng.uniform(0.05, 0.2), [rng.randrange(256) for _ in range(3)]) for _ in range(3)]
    frames = []
    for t in range(num_frames):
        base = np.stack([np.sin(5 * x + phase + 0.1 * t), np.cos(4 * y - phase), np.sin(3 * (x + y) + 0.05 * t)],
                        axis=-1)
        frame = ((base * 0.5 + 0.5) * 200).astype(np.uint8)
        for cx, cy, vx, vy, r, colour in shapes:
            frame[(x - (cx + vx * t) % 1) ** 2 + (y - (cy + vy * t) % 1) ** 2 < r * r] = colour
        frames.append(frame)
    return frames


def video_data_url(num_frames: int, rng: random.Random, width: int = 224, height: int = 224, fps: int = 2) -> str:
    """A seeded Motion-JPEG AVI (:func:`video_frames`) as a data URL."""
    data = mjpeg_avi(video_frames(num_frames, width, height, rng), fps)
    return "data:video/x-msvideo;base64," + base64.b64encode(data).decode()


def _request(kind: str, spec: WorkloadSpec, rng: random.Random) -> BenchRequest:
    if kind == "text":
        content = f"Continue this list: {words(spec.text_words, rng)}"
    elif kind == "longctx":
        content = f"Read the notes and summarise them.\n{words(spec.longctx_words, rng)}\nSummary:"
    elif kind == "image":
        content = [{"type": "image_url", "image_url": {"url": png_data_url(spec.image_size, rng)}}
                   for _ in range(spec.images_per_request)]
        content.append({"type": "text", "text": f"Describe the image. {words(8, rng)}"})
    elif kind == "video":
        content = [{"type": "video_url", "video_url": {"url": video_data_url(spec.video_frames, rng)}},
                   {"type": "text", "text": f"What happens in this video? {words(8, rng)}"}]
    elif kind == "audio":
        content = [{"type": "audio_url", "audio_url": {"url": wav_data_url(spec.audio_seconds, rng)}},
                   {"type": "text", "text": f"What is in this clip? {words(8, rng)}"}]
    else:
        raise ValueError(f"unknown request kind {kind!r} (known: text, longctx, image, video, audio)")
    return BenchRequest(kind, [{"role": "user", "content": content}], spec.max_tokens)


def build_workload(scenario: str, num_requests: int, *, seed: int = 0, spec: WorkloadSpec = WorkloadSpec(),
                   mixed_kinds: tuple[str, ...] = MIXED_KINDS) -> list[BenchRequest]:
    """``num_requests`` requests of one scenario; ``mixed`` cycles through ``mixed_kinds`` in a seeded shuffled
    order (equal shares). The same arguments always give the same requests."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    rng = random.Random(seed)
    if scenario == "mixed":
        if not mixed_kinds:
            raise ValueError("mixed needs at least one request kind")
        kinds = [mixed_kinds[i % len(mixed_kinds)] for i in range(num_requests)]
        rng.shuffle(kinds)
    else:
        kinds = [scenario] * num_requests
    return [_request(k, spec, rng) for k in kinds]


def scenario_kinds(scenario: str, mixed_kinds: tuple[str, ...] = MIXED_KINDS) -> tuple[str, ...]:
    return tuple(mixed_kinds) if scenario == "mixed" else (scenario,)
