"""Clear 4xx answers for bad requests that stock SGLang 0.5.23 answers with a 500 or accepts silently.

Installed in every process of a server started by ``python -m sgl_slim.launch`` (whatever the toggles);
a plain ``sglang.launch_server`` stays stock. Each check turns a client mistake into the ``ValueError`` /
error string that SGLang already maps to HTTP 400; nothing else changes.

1. Media the client pointed at but the server cannot use. ``BaseMultimodalProcessor._load_single_item`` maps
   only ``ValueError``, ``UnidentifiedImageError`` and ``requests`` errors to 400; a ``file://`` URL naming a
   missing file (``FileNotFoundError``), a directory, an unreadable file, or an image over PIL's pixel limit
   (``DecompressionBombError``) became a ``RuntimeError`` -> 500. AROUND hook: those causes become
   ``ValueError`` with the same message. Server faults (anything else) stay 500.
2. A modality the model has no placeholder for. Qwen2.5-VL's processor drops audio silently (200, the audio
   ignored); Qwen2-Audio's fails on an image (500). BEFORE hook on ``TokenizerManager._validate_mm_limits``
   (called for every request that carries media): reject it, naming the modalities the model accepts.
3. ``top_logprobs`` outside OpenAI's 0..20 (stock accepts -1 and answers with empty lists). AFTER hook on
   ``OpenAIServingChat._validate_request``.
"""

from __future__ import annotations

from sgl_slim.config import SlimConfig

_LOAD = "sglang.srt.multimodal.processors.base_processor.BaseMultimodalProcessor._load_single_item"
_MM_LIMITS = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_mm_limits"
_CHAT_VALIDATE = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._validate_request"

HOOKED_SYMBOLS: list[str] = [
    _LOAD,
    _MM_LIMITS,
    _CHAT_VALIDATE,
    "sglang.srt.multimodal.processors.base_processor.MultimodalSpecialTokens",
]

MODALITIES = ("image", "video", "audio")
TOP_LOGPROBS_MAX = 20          # OpenAI's documented range for chat completions: 0..20

_REGISTERED = False


def install(cfg: SlimConfig) -> None:  # noqa: ARG001 (same signature as the feature modules)
    """Register the three checks (idempotent; runs in every SGLang process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    HookRegistry.register(_LOAD, _load_single_item_around, HookType.AROUND)
    HookRegistry.register(_MM_LIMITS, _validate_mm_limits_before, HookType.BEFORE)
    HookRegistry.register(_CHAT_VALIDATE, _validate_request_after, HookType.AFTER)
    _REGISTERED = True


def client_media_error(exc: BaseException) -> bool:
    """Whether a media loader failure was caused by what the client sent (not by the server)."""
    from PIL import Image  # noqa: PLC0415

    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                            Image.DecompressionBombError))


def _load_single_item_around(original, cls, *args, **kwargs):
    try:
        return original(cls, *args, **kwargs)
    except RuntimeError as exc:
        cause = exc.__cause__
        if cause is not None and client_media_error(cause):
            raise ValueError(str(exc)) from cause
        raise


def accepted_modalities(mm_tokens) -> list[str]:
    """Modalities a processor has placeholder tokens for (``MultimodalSpecialTokens``)."""
    if mm_tokens is None:
        return []
    return [m for m in MODALITIES
            if getattr(mm_tokens, f"{m}_token", None) is not None
            or getattr(mm_tokens, f"{m}_token_id", None) is not None]


def unsupported_modality_error(obj, mm_tokens) -> str | None:
    """The error for a request carrying media of a kind the model cannot take, or None."""
    accepted = accepted_modalities(mm_tokens)
    if not accepted:                 # a processor without declared tokens: leave it to SGLang
        return None
    sent = [m for m in MODALITIES if getattr(obj, f"{m}_data", None)]
    refused = [m for m in sent if m not in accepted]
    if not refused:
        return None
    return (f"this model does not accept {' or '.join(refused)} input "
            f"(it accepts: {', '.join(accepted)}); remove the {refused[0]} part of the request")


def _validate_mm_limits_before(self, obj, *args, **kwargs):
    processor = getattr(self, "mm_processor", None)
    message = unsupported_modality_error(obj, getattr(processor, "mm_tokens", None))
    if message is not None:
        raise ValueError(message)


def top_logprobs_error(request) -> str | None:
    value = getattr(request, "top_logprobs", None)
    if value is None or 0 <= value <= TOP_LOGPROBS_MAX:
        return None
    return f"top_logprobs must be between 0 and {TOP_LOGPROBS_MAX}, got {value}"


def _validate_request_after(result, self, request, *args, **kwargs):
    if result is not None:
        return result
    return top_logprobs_error(request)
