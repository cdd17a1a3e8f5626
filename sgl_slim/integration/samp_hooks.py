"""Samp inside SGLang serving (Qwen2-Audio): fewer audio placeholders, exactly as many compressed embeddings.

Two hooks, one per process, agreeing on one number per clip: ``SampConfig.keep_count(N)``.

1. Tokenizer process, async AROUND on ``Qwen2AudioMultimodalProcessor.process_mm_data_async``: each clip's run
   of N ``<|AUDIO|>`` placeholders shrinks to K = keep_count(N) (the tail of the run is dropped; every later
   item's ``offsets`` shift left). Each item records its clip lengths (``audio_feature_lens``, one per clip,
   which also fixes stock SGLang putting every clip's length on the first item only) and ``samp_keep`` (K per
   clip), and gets a hash that mixes in the Samp settings (``set_hash``), so the embedding cache and the radix
   cache never mix compressed and uncompressed clips, nor two settings. The shrinking and the hash are shared
   with IDPruner (:mod:`sgl_slim.integration.mm_hooks`).
2. Scheduler process, AROUND on ``Qwen2AudioForConditionalGeneration.get_audio_feature``: a forward pre-hook on
   the audio tower's last layer captures that layer's input while the original runs (SGLang's encoder returns
   no attention maps); its attention statistics are recomputed from its own Q/K
   (:func:`sgl_slim.audio.encoder_attention_stats`, no padding mask: SGLang runs the encoder without one) and
   each clip's N projected tokens are compressed by :func:`sgl_slim.audio.samp_compress` to K rows.

Positions: the K kept tokens take consecutive 1-D positions (renumbered), like any K-token span; the text after
the clip moves N-K positions earlier than without Samp. This equals a transformers forward on the compressed
embeddings with ordinary positions (what the end-to-end test checks). Keeping the original positions would need
per-token offsets in extend and a per-request offset in decode (SGLANG_NOTES.md, audio paragraph).

keep_ratio 1.0 is an identity (keep == N forbids merging), so both hooks then leave everything untouched.
Items without raw features (precomputed embeddings) are passed through.
"""

from __future__ import annotations

import logging

import torch

from sgl_slim.config import SampConfig, SlimConfig
from sgl_slim.integration import mm_hooks
from sgl_slim.integration.containment import (audio_token_lengths, contain, contain_output, evenly_spaced,
                                               prepare_audio_output)
from sgl_slim.integration.request_hooks import settings_of_request

logger = logging.getLogger(__name__)

_PROCESSOR = "sglang.srt.multimodal.processors.qwen_audio.Qwen2AudioMultimodalProcessor.process_mm_data_async"
_AUDIO_FEATURE = "sglang.srt.models.qwen2_audio.Qwen2AudioForConditionalGeneration.get_audio_feature"

HOOKED_SYMBOLS: list[str] = [
    _PROCESSOR,
    _AUDIO_FEATURE,
    *mm_hooks.HOOKED_SYMBOLS,
]

KEEP_KEY = "samp_keep"            # model_specific_data: K per clip (list[int]) set by the tokenizer-side hook
RATIO_KEY = "samp_keep_ratio"     # model_specific_data: the keep ratio K was computed with (the request's own)

# this process's settings (HOOKS.cfg, a SampConfig) and both hooks
HOOKS = mm_hooks.FeatureHooks("samp", lambda: [
    (_PROCESSOR, _process_mm_data_around, "AROUND"),
    (_AUDIO_FEATURE, _get_audio_feature_around, "AROUND"),
])


def install(cfg: SlimConfig) -> None:
    """Register both hooks (idempotent; safe in every SGLang process)."""
    HOOKS.install(cfg)


# -------------------------------------------------------------------------------------------------------------
# Tokenizer process
# -------------------------------------------------------------------------------------------------------------

def settings_hash(base: int, samp: SampConfig) -> int:
    """64-bit hash of (item hash, Samp settings): a compressed clip never shares a cache entry with another."""
    return mm_hooks.hash_settings("samp-v1", base, repr(samp.keep_ratio), repr(samp.merge_threshold))


def shrink_placeholders(out, samp: SampConfig):
    """Shrink every raw audio clip's placeholder run in a MultimodalProcessorOutput to keep_count(N), in place.

    Returns ``out``. Items of other modalities or with precomputed embeddings only have their offsets shifted.
    Every raw audio item also gets its own ``audio_feature_lens`` (stock 0.5.23 puts all clips' lengths on the
    first item only, and a request with two clips then crashes the scheduler in get_audio_feature); at
    keep_ratio 1.0 that is the only change (no keep counts, hashes untouched).
    """
    if out is None or not out.mm_items or out.input_ids is None:
        return out

    def compressed(item) -> bool:                        # raw audio (not precomputed embeddings)
        return item.is_audio() and item.feature is not None

    runs = mm_hooks.placeholder_runs(out, lambda item, n: samp.keep_count(n) if compressed(item) and n >= 1 else None)
    mm_hooks.drop_placeholders(out, runs)
    for item in out.mm_items:
        item_runs = [run for run in runs if run.item is item]
        if not compressed(item) or not item_runs:
            continue
        run_lens, run_keeps = [run.n for run in item_runs], [run.keep for run in item_runs]
        clip_lens, clip_keeps = run_lens, run_keeps
        mask = item.model_specific_data.get("feature_attention_mask")
        if mask is not None:
            # a clip too short for one token has length 0 and no placeholder run: keep 0 of 0
            clip_lens = audio_token_lengths(mask)
            if [n for n in clip_lens if n > 0] != run_lens:
                raise ValueError(f"Samp: audio placeholder runs {run_lens} disagree with the clip lengths "
                                 f"{clip_lens} from feature_attention_mask")
            kept = iter(run_keeps)
            clip_keeps = [next(kept) if n > 0 else 0 for n in clip_lens]
        item.audio_feature_lens = torch.tensor(clip_lens, dtype=torch.long)
        if clip_keeps == clip_lens:
            continue
        item.model_specific_data[KEEP_KEY] = clip_keeps
        item.model_specific_data[RATIO_KEY] = samp.keep_ratio
        mm_hooks.mark_shrunk(item, sum(run_lens), lambda base: settings_hash(base, samp))
    mm_hooks.rebuild_padded_input_ids(out)
    return out


async def _process_mm_data_around(original, self, *args, **kwargs):
    out = prepare_audio_output(await original(self, *args, **kwargs))   # bad clips: 400 here
    if not HOOKS.on:
        return out
    samp = settings_of_request(kwargs.get("request_obj")).samp(HOOKS.cfg)   # the request's own keep ratio, if any
    return contain_output("audio", out, lambda o: shrink_placeholders(o, samp))


# -------------------------------------------------------------------------------------------------------------
# Scheduler process
# -------------------------------------------------------------------------------------------------------------

def compress_audio_feature(original, model, items, samp: SampConfig) -> torch.Tensor:
    """Run ``original(model, items)`` (concatenated [sum N, D] tokens) and return [sum K, D] Samp tokens."""
    keeps: list[int | None] = []
    ratios: list[float] = []               # per clip: the keep ratio its tokenizer-side K was computed with
    for item in items:
        item_keeps = item.model_specific_data.get(KEEP_KEY)
        clips = item.feature.shape[0]
        keeps += list(item_keeps) if item_keeps is not None else [None] * clips
        ratios += [item.model_specific_data.get(RATIO_KEY, samp.keep_ratio)] * clips
    if all(k is None for k in keeps):
        return original(model, items)

    layer = model.audio_tower.layers[-1]
    captured: list[torch.Tensor] = []

    def _capture(_module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(_capture, with_kwargs=True)
    try:
        tokens = original(model, items)                                        # [sum N, D]
    finally:
        handle.remove()
    # From here on the work is sgl_slim's: if the clips do not line up (an sgl_slim bug), the uncompressed
    # tokens go back and SGLang fits them to the placeholders (keeping the last rows, with its own warning).
    return contain("audio", f"{len(items)} audio items",
                   lambda: _compress_tokens(tokens, captured, items, keeps, ratios, layer, samp), lambda: tokens,
                   instead="the uncompressed tokens")


def _compress_tokens(tokens, captured, items, keeps, ratios, layer, samp: SampConfig) -> torch.Tensor:
    from sgl_slim.audio import encoder_attention_stats, samp_compress

    lens = [int(n) for n in torch.cat([item.audio_feature_lens.reshape(-1) for item in items]).tolist()]
    if len(lens) != len(keeps) or len(captured) != 1 or captured[0].shape[0] != len(lens):
        raise RuntimeError(f"Samp: {len(lens)} clip lengths, {len(keeps)} keep counts and "
                           f"{[tuple(c.shape) for c in captured]} captured encoder inputs do not line up")
    if sum(lens) != tokens.shape[0]:
        raise RuntimeError(f"Samp: encoder returned {tokens.shape[0]} tokens for clips of {lens}")
    todo = [c for c, (n, k) in enumerate(zip(lens, keeps)) if k is not None and k != n]
    for c in todo:
        if not 1 <= keeps[c] <= lens[c]:
            raise RuntimeError(f"Samp: tokenizer kept {keeps[c]} of {lens[c]} tokens of clip {c}")
        expected = SampConfig(keep_ratio=ratios[c]).keep_count(lens[c])
        if keeps[c] != expected:
            raise RuntimeError(f"Samp: tokenizer kept {keeps[c]} of {lens[c]} tokens but keep ratio {ratios[c]} "
                               f"keeps {expected}: all processes must share --samp-* flags")

    def _stats() -> dict:   # statistics over the 2N frames that pool into each clip's N tokens
        per_clip = encoder_attention_stats(layer, captured[0][todo], valid_frames=[2 * lens[c] for c in todo],
                                           n_tokens=[lens[c] for c in todo])
        return dict(zip(todo, per_clip))

    stats = contain("audio", f"encoder attention statistics of {len(todo)} clips", _stats, dict,
                    data=captured[0][todo]) if todo else {}
    out = []
    for c, (clip_tokens, n, k) in enumerate(zip(torch.split(tokens, lens), lens, keeps)):
        if c not in todo:
            out.append(clip_tokens)
            continue
        uniform = lambda clip_tokens=clip_tokens, n=n, k=k: clip_tokens[evenly_spaced(n, k).to(clip_tokens.device)]
        if c not in stats:     # the statistics failed (already logged and counted once)
            out.append(uniform())
            continue
        out.append(contain(
            "audio", f"clip {c} ({n} tokens, keep {k})",
            lambda clip_tokens=clip_tokens, c=c, k=k: samp_compress(clip_tokens, stats[c], keep=k,
                                                                    merge_threshold=samp.merge_threshold)[0],
            uniform, data=clip_tokens,
            valid=lambda kept, k=k, clip_tokens=clip_tokens: kept.shape == (k, clip_tokens.shape[1])))
    return torch.cat(out, dim=0)


def _get_audio_feature_around(original, self, items):
    # Only clips the tokenizer shrank carry keep counts (keep ratio 1.0, the server's or a request's, is the
    # identity and leaves none): a batch without any runs the original as is.
    if not HOOKS.on or not any(KEEP_KEY in item.model_specific_data for item in items):
        return original(self, items)
    with torch.no_grad():
        return compress_audio_feature(original, self, items, HOOKS.cfg)
