"""What the vision-language end-to-end tests share: their generated images and videos, decoding a video the way
the server does on this machine, and the comparison of a server's greedy generation with a transformers one."""

from __future__ import annotations

import io
import random

# float32 end to end: a server and transformers differ only by summation order (~1e-6 in logprobs); wrong
# positions move them by ~1e-3 or more on the position-sensitive model copies (each test file checks its own).
LOGPROB_TOL = 1e-4


def image_png(width: int, height: int, seed: int) -> bytes:
    """Smooth blobs + noise (neighbouring tokens are similar, as in photos), as PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), np.sin(4 * (x + y))], axis=-1)
    arr = ((base * 0.5 + 0.5) * 200 + rng.random((height, width, 3)) * 55).clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def video_avi(num_frames: int, seed: int, size: int) -> bytes:
    """A Motion-JPEG AVI at 2 fps of ``size`` x ``size`` frames (sgl_slim.bench.workload's scene)."""
    from sgl_slim.bench.workload import mjpeg_avi, video_frames

    return mjpeg_avi(video_frames(num_frames, size, size, random.Random(seed)), fps=2)


def decode_video(video: bytes):
    """Every frame of a video, [T, C, H, W] uint8 (decord, the decoder the server uses on this machine)."""
    import decord
    import torch

    reader = decord.VideoReader(io.BytesIO(video))
    return torch.from_numpy(reader.get_batch(list(range(len(reader)))).asnumpy()).permute(0, 3, 1, 2)


def assert_same_generation(got: dict, want: dict) -> None:
    """Greedy ids equal (the server may stop early at EOS) and each token's logprob within LOGPROB_TOL."""
    ids = got["output_ids"]
    assert ids == want["output_ids"][:len(ids)], f"server {ids} vs transformers {want['output_ids']}"
    lps = [lp for lp, *_ in got["meta_info"]["output_token_logprobs"]]
    worst = max(abs(a - b) for a, b in zip(lps, want["logprobs"]))
    assert worst <= LOGPROB_TOL, f"logprobs differ by {worst:.2e}: server {lps} vs transformers {want['logprobs']}"
