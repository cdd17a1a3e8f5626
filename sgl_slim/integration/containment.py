"""One request's bad data never stops a server: sgl_slim's per-request work inside SGLang is contained here.

SGLang runs sgl_slim's per-request code in two processes. An exception in the scheduler kills the whole server,
and one in the tokenizer fails the request with a 500, so every hook runs its own work through the two helpers
below, once, instead of catching per case:

- :func:`contain_output` (tokenizer process): a feature's transform of a ``MultimodalProcessorOutput`` (the
  placeholder shrinking of IDPruner and Samp). On failure the output is restored exactly as SGLang built it and
  the request goes through unpruned / uncompressed (the scheduler-side hooks only act on items the transform
  marked).
- :func:`contain` (scheduler process): a feature's selection for ONE item (an image, a clip). The placeholders
  were already sized in the tokenizer, so the item cannot go through unpruned there; on failure (or an invalid
  result) it falls back to a deterministic, evenly spaced choice of the same count (:func:`evenly_spaced`),
  and the batch goes on. The same helper wraps each hook's bookkeeping around the items as a whole (shapes
  that do not line up: the unpruned rows go back and SGLang fits them to the placeholders; a failed position
  fix keeps the provisional positions).

Every fallback logs one line and counts ``sgl_slim_fallbacks_total{model_name, feature, reason}`` (with SGLang's
``--enable-metrics``), reason = ``nonfinite`` | ``empty`` | ``error`` (see :func:`fallback_reason`).
Bad media itself is the client's mistake and stays a 400 at the tokenizer (``input_checks`` and
:func:`check_audio_items`); only sgl_slim's own failures are contained. ``BaseException`` (KeyboardInterrupt,
SystemExit) is never caught.

Installed in every process of a server started by ``python -m sgl_slim.launch``, whatever the toggles: with
Samp off it registers the Qwen2-Audio processor hook that gives every audio item its own clip lengths (stock
SGLang 0.5.23 puts all clips' lengths on the first item, and a request with several clips then makes the
scheduler raise ``AttributeError: 'MultimodalDataItem' object has no attribute 'audio_feature_lens'`` and the
server exit) and refuses clips whose samples are not finite. With Samp on, Samp's own hook on the same
function does both (one AROUND hook per function).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

import torch

from sgl_slim.config import SlimConfig

logger = logging.getLogger("sgl_slim")

_AUDIO_PROCESSOR = ("sglang.srt.multimodal.processors.qwen_audio.Qwen2AudioMultimodalProcessor"
                    ".process_mm_data_async")

HOOKED_SYMBOLS: list[str] = [
    _AUDIO_PROCESSOR,
    "sglang.srt.models.qwen2_audio.Qwen2AudioForConditionalGeneration.get_audio_feature",  # reads the lengths
    "sglang.srt.managers.schedule_batch.MultimodalDataItem.is_audio",
    "sglang.srt.plugins.hook_registry.HookRegistry.register",
]

FEATURES = ("vision", "audio")
REASONS = ("nonfinite", "empty", "error")

T = TypeVar("T")
_REGISTERED = False


def install(cfg: SlimConfig) -> None:
    """Register the stock-crash fix for Qwen2-Audio unless Samp's hook (which includes it) is on. Idempotent."""
    global _REGISTERED
    if _REGISTERED or cfg.samp.enabled:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    HookRegistry.register(_AUDIO_PROCESSOR, _audio_processor_around, HookType.AROUND)
    _REGISTERED = True


# -------------------------------------------------------------------------------------------------------------
# Fallback bookkeeping: one log line and one counter increment per fallback
# -------------------------------------------------------------------------------------------------------------

def fallback_reason(exc: BaseException | None, data: torch.Tensor | None = None) -> str:
    """``empty`` / ``nonfinite`` when the item's input says so, else ``error``."""
    if isinstance(data, torch.Tensor):
        if data.numel() == 0:
            return "empty"
        if data.is_floating_point() and not bool(torch.isfinite(data).all()):
            return "nonfinite"
    return "error"


def record_fallback(feature: str, reason: str, detail: str) -> None:
    """Log one line and count the fallback (Prometheus only when SGLang's metrics are on in this process)."""
    logger.warning("sgl_slim %s: fallback (%s): %s", feature, reason, detail)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):    # SGLang sets it exactly when --enable-metrics is on
        return
    try:
        from sgl_slim.integration.metrics import PROMETHEUS, _served_model_name  # noqa: PLC0415
        PROMETHEUS.count_fallback(feature, reason, _served_model_name(None))
    except Exception:   # a metrics failure must not turn a contained fallback into a crash
        logger.exception("sgl_slim: counting a %s fallback failed", feature)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


# -------------------------------------------------------------------------------------------------------------
# Scheduler process: one item's selection
# -------------------------------------------------------------------------------------------------------------

def evenly_spaced(n: int, k: int) -> torch.Tensor:
    """``k`` distinct indices spread evenly over ``range(n)`` (sorted LongTensor; 1 <= k <= n)."""
    if not 1 <= k <= n:
        raise ValueError(f"evenly_spaced: need 1 <= k <= n, got k={k}, n={n}")
    return torch.arange(k, dtype=torch.long) * n // k


def valid_keep(keep, n: int, k: int) -> bool:
    """Whether ``keep`` is exactly ``k`` sorted distinct indices in ``range(n)``."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.long or keep.shape != (k,):
        return False
    if k == 0:
        return True
    keep = keep.cpu()
    return bool(keep[0] >= 0) and bool(keep[-1] < n) and bool((keep[1:] > keep[:-1]).all())


def contain(feature: str, what: str, work: Callable[[], T], fallback: Callable[[], T], *,
            data: torch.Tensor | None = None, valid: Callable[[T], bool] | None = None,
            instead: str = "an evenly spaced selection") -> T:
    """``work()``, or ``fallback()`` (one log line, one count) when it raises or its result is not ``valid``.

    ``what`` names the item in the log line, ``instead`` what the fallback does; ``data`` is the item's input,
    used only to name the reason. ``fallback`` must not fail (it is plain indexing); if it does, that is a bug
    in sgl_slim and it propagates.
    """
    try:
        result = work()
    except Exception as exc:  # sgl_slim's own per-item work: contained, never silent
        record_fallback(feature, fallback_reason(exc, data), f"{what}: {_describe(exc)}; used {instead}")
        return fallback()
    if valid is not None and not valid(result):
        record_fallback(feature, fallback_reason(None, data), f"{what}: invalid result; used {instead}")
        return fallback()
    return result


# -------------------------------------------------------------------------------------------------------------
# Tokenizer process: a feature's transform of the processor output
# -------------------------------------------------------------------------------------------------------------

def _attributes(obj) -> dict:
    """Every attribute a transform may change: declared fields (msgspec structs, dataclasses) and the
    instance ``__dict__`` (where SGLang and sgl_slim add attributes such as ``audio_feature_lens``)."""
    names = list(getattr(type(obj), "__struct_fields__", ())) + list(getattr(obj, "__dataclass_fields__", {}))
    state = {name: getattr(obj, name) for name in names}
    state.update(getattr(obj, "__dict__", {}))
    return state


def _restore(obj, state: dict) -> None:
    for name in [n for n in getattr(obj, "__dict__", {}) if n not in state]:
        delattr(obj, name)                                   # added by the failed transform
    for name, value in state.items():
        setattr(obj, name, value)


def _snapshot(out) -> Callable[[], None]:
    """A function restoring ``out`` and its items to their state now (shallow: the transforms replace fields
    and only mutate ``model_specific_data`` in place, which is copied)."""
    saved_out = _attributes(out)
    saved_items = []
    for item in out.mm_items or []:
        state = _attributes(item)
        msd = state.get("model_specific_data")
        saved_items.append((item, state, dict(msd) if isinstance(msd, dict) else None))

    def restore() -> None:
        for item, state, msd in saved_items:
            _restore(item, state)
            if msd is not None:
                item.model_specific_data.clear()
                item.model_specific_data.update(msd)
        _restore(out, saved_out)

    return restore


def contain_output(feature: str, out, transform: Callable[[object], object]):
    """``transform(out)``; on failure ``out`` exactly as SGLang built it (the request goes through unchanged)."""
    if out is None:
        return out
    restore = _snapshot(out)
    try:
        return transform(out)
    except Exception as exc:  # sgl_slim's own work on a request SGLang accepted: contained, never silent
        restore()
        record_fallback(feature, "error", f"placeholder shrinking failed ({_describe(exc)}); request served "
                        f"without {'IDPruner' if feature == 'vision' else 'Samp'}")
        return out


# -------------------------------------------------------------------------------------------------------------
# Qwen2-Audio items: per-item clip lengths (stock crash) and finite samples (bad media -> 400)
# -------------------------------------------------------------------------------------------------------------

def _raw_audio(item) -> bool:
    return item.is_audio() and getattr(item, "feature", None) is not None


def check_audio_items(out) -> None:
    """Refuse (ValueError -> HTTP 400) a clip whose features are not finite (a float WAV holding NaN or inf)."""
    clip = 0
    for item in out.mm_items or []:
        if not _raw_audio(item):
            continue
        feature = item.feature
        if isinstance(feature, torch.Tensor) and feature.is_floating_point():
            per_clip = feature.reshape(feature.shape[0], -1) if feature.dim() > 1 else feature.reshape(1, -1)
            bad = (~torch.isfinite(per_clip)).any(dim=1)
            if bool(bad.any()):
                first = clip + int(bad.nonzero()[0, 0])
                raise ValueError(f"audio clip {first} gives non-finite audio features: its samples hold NaN or inf, "
                                 f"or values so large that the spectrum overflows; send PCM, or float samples "
                                 f"in [-1, 1]")
            clip += per_clip.shape[0]


def audio_token_lengths(feature_attention_mask: torch.Tensor) -> list[int]:
    """Qwen2-Audio tokens per clip from its mel mask [C, T_mel] (conv stride 2, then avg-pool 2)."""
    mel = feature_attention_mask.reshape(-1, feature_attention_mask.shape[-1]).sum(dim=-1).long()
    frames = (mel - 1) // 2 + 1
    return ((frames - 2) // 2 + 1).tolist()


def set_audio_lengths(out) -> None:
    """Give every raw audio item its own ``audio_feature_lens``: tokens per clip from its mel mask (a clip too
    short for one token counts 0 and has no placeholder run), else from its placeholder runs."""
    for item in out.mm_items or []:
        if not _raw_audio(item):
            continue
        mask = item.model_specific_data.get("feature_attention_mask")
        if isinstance(mask, torch.Tensor):
            lens = audio_token_lengths(mask)
        elif item.offsets:
            lens = [end - start + 1 for start, end in item.offsets]
        else:
            continue
        item.audio_feature_lens = torch.tensor(lens, dtype=torch.long)


def prepare_audio_output(out):
    """Both fixes above, in place; ``out`` returned. Called by every Qwen2-Audio processor hook."""
    if out is None or not out.mm_items:
        return out
    check_audio_items(out)
    set_audio_lengths(out)
    return out


async def _audio_processor_around(original, self, *args, **kwargs):
    return prepare_audio_output(await original(self, *args, **kwargs))
