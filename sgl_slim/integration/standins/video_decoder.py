"""Video requests on a host where torchcodec finds no FFmpeg.

SGLang 0.5.23 decodes videos with torchcodec and falls back to decord only when ``torchcodec.decoders`` does not
import. But torchcodec imports without FFmpeg's shared libraries (it loads them lazily, for its image decoders'
sake) and then fails on every video ("Could not load libtorchcodec"), so on such a host (the CPU machines this
project is built on have none) every video request is refused. When torchcodec reports no FFmpeg and decord
(whose wheel carries its own FFmpeg) imports, this switches SGLang's choice to its own decord path, in every
SGLang process. Nothing changes where torchcodec works.
Installed in servers started by ``python -m sgl_slim.launch``.
"""

from __future__ import annotations

import importlib
import logging

from sgl_slim.config import SlimConfig

logger = logging.getLogger("sgl_slim")

_DECODER_MODULE = "sglang.srt.utils.video_decoder"
HOOKED_SYMBOLS: list[str] = [
    f"{_DECODER_MODULE}._BACKEND",                 # "torchcodec" or "decord", read on every decode
    f"{_DECODER_MODULE}.VideoDecoderWrapper",
]


def torchcodec_has_ffmpeg() -> bool:
    """Whether torchcodec can decode videos here (False when it is missing or found no FFmpeg libraries)."""
    try:
        ops = importlib.import_module("torchcodec._core.ops")
    except Exception:        # noqa: BLE001 - not installed, or broken: it cannot decode
        return False
    return bool(getattr(ops, "_FFMPEG_AVAILABLE", True))


def decord_available() -> bool:
    try:
        importlib.import_module("decord")
    except Exception:        # noqa: BLE001
        return False
    return True


def install(cfg: SlimConfig) -> None:  # noqa: ARG001
    decoder = importlib.import_module(_DECODER_MODULE)
    if decoder._BACKEND != "torchcodec" or torchcodec_has_ffmpeg() or not decord_available():
        return
    decoder._BACKEND = "decord"
    logger.info("sgl_slim: torchcodec found no FFmpeg libraries; videos are decoded with decord")
