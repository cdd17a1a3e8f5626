"""IDPruner inside SGLang serving (Qwen2.5-VL; Qwen2-VL and Qwen3-VL share the path): each image keeps
K = IDPrunerConfig.keep_count(N) of its N vision tokens, chosen by MMR before LLM layer 0, and the kept tokens
keep their ORIGINAL M-RoPE (t, h, w) positions.

Three hooks (route proven in shared/SGLANG_NOTES.md), agreeing on K per image:

1. Tokenizer process, async AROUND on ``QwenVLImageProcessor.process_mm_data_async``: each image's run of N
   placeholders shrinks to K (the tail is dropped; later offsets shift). ``mrope_positions`` loses the same
   columns (the K slots keep provisional positions, fixed in step 3); ``mrope_position_delta`` grows by the
   total dropped, so the text after an image and every decode step keep their unpruned positions. The image's
   N, K and original (3, N) positions ride along in ``model_specific_data``; the item hash mixes in the pruning
   settings (``set_hash``), so the radix and embedding caches never mix pruned and unpruned images. The
   shrinking and the hash are shared with Samp (:mod:`sgl_slim.integration.mm_hooks`).
2. Scheduler, AFTER on ``<Model>.get_image_feature``: split the vision output per item (N = t*h*w / merge^2),
   select the tokenizer's K rows with :func:`sgl_slim.vision.idpruner_select`, return only those. The LOCAL
   keep indices are remembered per item hash (the embedding cache skips get_image_feature on a hit; a repeated
   image may sit at another offset).
3. Scheduler, AROUND on ``mm_utils.prepare_mm_inputs`` (runs right before the language model, on every
   prefill chunk): overwrite, in place, the positions of this chunk's kept slots in
   ``forward_batch.mrope_positions`` (the tensor the model reads) with the kept tokens' original positions.

keep_ratio 1.0 (K == N for every image) leaves requests byte-identical to stock SGLang. Videos, precomputed
embeddings and other modalities pass through untouched.
Not covered (documented in shared/SGLANG_NOTES.md): GPU prefill CUDA graphs replaying static position
buffers, caller-supplied ``mm_hashes`` (they overwrite the settings-mixed hash), ``--tokenizer-worker-num > 1``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch

from sgl_slim.config import IDPrunerConfig, SlimConfig
from sgl_slim.integration import mm_hooks
from sgl_slim.integration.containment import contain, contain_output, evenly_spaced, valid_keep
from sgl_slim.integration.request_hooks import settings_of_request

logger = logging.getLogger(__name__)

_PROCESSOR = "sglang.srt.multimodal.processors.qwen_vl.QwenVLImageProcessor.process_mm_data_async"
_PREPARE = "sglang.srt.managers.mm_utils.prepare_mm_inputs"
_IMAGE_FEATURE = {
    "qwen2_5_vl": "sglang.srt.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration.get_image_feature",
    "qwen2_vl": "sglang.srt.models.qwen2_vl.Qwen2VLForConditionalGeneration.get_image_feature",
    "qwen3_vl": "sglang.srt.models.qwen3_vl.Qwen3VLForConditionalGeneration.get_image_feature",
}

HOOKED_SYMBOLS: list[str] = [
    _PROCESSOR,
    _PREPARE,
    *_IMAGE_FEATURE.values(),
    *mm_hooks.HOOKED_SYMBOLS,
]

# model_specific_data keys set by the tokenizer-side hook on each image it shrank (N_KEY marks those images)
N_KEY = "idpruner_n"                    # int: tokens the image has before pruning
K_KEY = "idpruner_k"                    # int: tokens it keeps, keep_count(N)
POS_KEY = "idpruner_positions"          # LongTensor [3, N]: the image's original M-RoPE positions
KEEP_KEY = "idpruner_keep"              # LongTensor [K]: local kept indices (set in the scheduler)

# this process's settings (HOOKS.cfg, an IDPrunerConfig) and the three hooks
HOOKS = mm_hooks.FeatureHooks("idpruner", lambda: [
    (_PROCESSOR, _process_mm_data_around, "AROUND"),
    *((target, _get_image_feature_after, "AFTER") for target in _IMAGE_FEATURE.values()),
    (_PREPARE, _prepare_mm_inputs_around, "AROUND"),
])
_SCORER = None                           # loaded lazily in the scheduler when cfg.scorer is set
_SCORER_LOCK = threading.Lock()


def install(cfg: SlimConfig) -> None:
    """Register the three hooks (idempotent; runs in every SGLang process)."""
    HOOKS.install(cfg)


# -------------------------------------------------------------------------------------------------------------
# Tokenizer process
# -------------------------------------------------------------------------------------------------------------

def settings_hash(base: int, cfg: IDPrunerConfig) -> int:
    """64-bit hash of (item hash, pruning settings): a pruned image never shares a cache entry with another
    setting or with the unpruned image."""
    return mm_hooks.hash_settings("idpruner-v1", base, repr(cfg.keep_ratio), repr(cfg.mmr_lambda),
                                  str(cfg.min_tokens), cfg.scorer or "")


def shrink_placeholders(out, cfg: IDPrunerConfig):
    """Shrink each raw image's placeholder run in a MultimodalProcessorOutput to keep_count(N), in place.

    Returns ``out``. When no image loses a token (keep ratio 1.0, or tiny images) nothing is touched.
    """
    if out is None or not out.mm_items or out.input_ids is None:
        return out

    def keep_count(item, n: int) -> int | None:
        prunable = item.is_image() and item.feature is not None and len(item.offsets or []) == 1
        return cfg.keep_count(n) if prunable else None

    runs = mm_hooks.placeholder_runs(out, keep_count)
    shrunk = [run for run in runs if run.keep < run.n]
    if not shrunk:
        return out                                      # nothing to prune: leave the request as stock
    positions = out.mrope_positions                     # [3, L] or None
    for run in shrunk:
        run.item.model_specific_data[N_KEY] = run.n
        run.item.model_specific_data[K_KEY] = run.keep
        if positions is not None:
            run.item.model_specific_data[POS_KEY] = positions[:, run.start:run.end + 1].clone()
    cols = mm_hooks.drop_placeholders(out, runs)
    if positions is not None:
        out.mrope_positions = positions[:, cols]
    if out.mrope_position_delta is not None:
        out.mrope_position_delta = out.mrope_position_delta + sum(run.n - run.keep for run in shrunk)
    for run in shrunk:
        mm_hooks.mark_shrunk(run.item, run.n, lambda base: settings_hash(base, cfg))
    mm_hooks.rebuild_padded_input_ids(out)
    return out


async def _process_mm_data_around(original, self, *args, **kwargs):
    out = await original(self, *args, **kwargs)
    if not HOOKS.on:
        return out
    request_obj = kwargs.get("request_obj", args[2] if len(args) > 2 else None)   # (image_data, input_text, obj)
    cfg = settings_of_request(request_obj).idpruner(HOOKS.cfg)         # the request's own keep ratio, if any
    return contain_output("vision", out, lambda o: shrink_placeholders(o, cfg))


# -------------------------------------------------------------------------------------------------------------
# Scheduler process: selection
# -------------------------------------------------------------------------------------------------------------

class _KeepStore:
    """LRU of local keep indices per item hash, bounded by the number of stored indices."""

    def __init__(self, max_indices: int = 1 << 24):
        self._data: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._size = 0
        self._max = max_indices
        self._lock = threading.Lock()

    def put(self, key: int, keep: torch.Tensor) -> None:
        with self._lock:
            if key in self._data:
                self._size -= self._data.pop(key).numel()
            self._data[key] = keep
            self._size += keep.numel()
            while self._size > self._max and len(self._data) > 1:
                _, old = self._data.popitem(last=False)
                self._size -= old.numel()

    def get(self, key: int) -> torch.Tensor | None:
        with self._lock:
            keep = self._data.get(key)
            if keep is not None:
                self._data.move_to_end(key)
            return keep


_KEEP = _KeepStore()


def _scorer(device, dtype):
    global _SCORER
    cfg = HOOKS.cfg
    if cfg is None or cfg.scorer is None:
        return None
    with _SCORER_LOCK:
        if _SCORER is None:
            from sgl_slim.vision.scorer import load_scorer  # noqa: PLC0415
            _SCORER = load_scorer(cfg.scorer, device=device)
            logger.info("sgl_slim idpruner: loaded importance scorer from %s", cfg.scorer)
    return _SCORER


def _merge_size(model) -> int:
    visual = getattr(model, "visual", None)
    size = getattr(visual, "spatial_merge_size", None)
    if size is None:
        size = model.config.vision_config.spatial_merge_size
    return int(size)


def _llm_width(model) -> int | None:
    text_cfg = getattr(model.config, "text_config", None) or model.config
    return getattr(text_cfg, "hidden_size", None)


def select_rows(rows: torch.Tensor, keep: int, cfg: IDPrunerConfig, *, feature_width: int | None = None):
    """Local keep indices (sorted LongTensor on CPU) for one image's rows [N, W]. The MMR features are the first
    ``feature_width`` columns (Qwen3-VL appends DeepStack features to each row)."""
    from sgl_slim.vision import idpruner_select  # noqa: PLC0415

    feats = rows if feature_width is None or feature_width >= rows.shape[1] else rows[:, :feature_width]
    scorer = _scorer(feats.device, feats.dtype)
    importance = scorer(feats) if scorer is not None else None
    return idpruner_select(feats, importance, keep, mmr_lambda=cfg.mmr_lambda).cpu()


def _get_image_feature_after(result, self, items, *args, **kwargs):
    if not HOOKS.on or not any(N_KEY in item.model_specific_data for item in items):
        return None                                     # AFTER hook: None keeps the original result
    # A failure outside the per-image selection (shapes that do not line up) keeps the unpruned rows: SGLang
    # then fits them to the placeholders (with its own warning) instead of the scheduler dying.
    return contain("vision", f"{len(items)} images", lambda: prune_rows(result, self, items), lambda: None,
                   instead="the unpruned rows")


def prune_rows(result, self, items) -> torch.Tensor:
    """The kept rows of ``result`` (get_image_feature's [sum N, W]) for ``items``, in item order."""
    if not isinstance(result, torch.Tensor) or result.dim() != 2:
        raise RuntimeError(f"idpruner: get_image_feature returned {type(result).__name__} "
                           f"{getattr(result, 'shape', '')}; expected one [tokens, dim] tensor")
    merge = _merge_size(self)
    sizes = [int(torch.as_tensor(item.image_grid_thw).reshape(-1, 3).prod(dim=1).sum()) // merge ** 2
             for item in items]
    if sum(sizes) != result.shape[0]:
        raise RuntimeError(f"idpruner: vision tower returned {result.shape[0]} rows for images of "
                           f"{sizes} tokens (merge {merge})")
    width = _llm_width(self)
    pieces = []
    for item, rows in zip(items, torch.split(result, sizes, dim=0)):
        n = item.model_specific_data.get(N_KEY)
        if n is None:
            pieces.append(rows)
            continue
        if n != rows.shape[0]:
            raise RuntimeError(f"idpruner: image has {rows.shape[0]} vision tokens but its placeholders were "
                               f"sized for {n}")
        k = item.model_specific_data[K_KEY]
        keep = contain("vision", f"image of {n} tokens (keep {k})",
                       lambda rows=rows, k=k: select_rows(rows, k, HOOKS.cfg, feature_width=width),
                       lambda n=n, k=k: evenly_spaced(n, k), data=rows,
                       valid=lambda kp, n=n, k=k: valid_keep(kp, n, k))
        item.model_specific_data[KEEP_KEY] = keep
        _KEEP.put(item.hash, keep)
        pieces.append(rows.index_select(0, keep.to(rows.device)))
    return torch.cat(pieces, dim=0)


# -------------------------------------------------------------------------------------------------------------
# Scheduler process: positions
# -------------------------------------------------------------------------------------------------------------

def _keep_for(item) -> torch.Tensor:
    keep = item.model_specific_data.get(KEEP_KEY)
    if keep is None:
        keep = _KEEP.get(item.hash)
        if keep is None:
            raise RuntimeError("idpruner: no kept-token indices for an image whose embedding came from a cache "
                               "entry this process did not select; restart the server or disable the "
                               "multimodal embedding cache")
        item.model_specific_data[KEEP_KEY] = keep
    return keep


def _prepare_mm_inputs_around(original, input_ids, forward_batch, *args, **kwargs):
    if not HOOKS.on:
        return original(input_ids, forward_batch, *args, **kwargs)
    # The original sets forward_batch.mm_inputs to None: take what we need first.
    mode = forward_batch.forward_mode
    pending = []                                        # (batch offset of the request's chunk, prefix, extend, mm)
    mm_inputs = forward_batch.mm_inputs
    if (mm_inputs is not None and forward_batch.mrope_positions is not None and not mode.is_decode()
            and not mode.is_target_verify()):
        offset = 0
        for i, mm in enumerate(mm_inputs):
            prefix = int(forward_batch.extend_prefix_lens_cpu[i])
            extend = int(forward_batch.extend_seq_lens_cpu[i])
            if mm is not None and any(N_KEY in item.model_specific_data for item in mm.mm_items):
                pending.append((offset, prefix, extend, mm))
            offset += extend
    result = original(input_ids, forward_batch, *args, **kwargs)
    for offset, prefix, extend, mm in pending:
        contain("vision", "kept-token positions",
                lambda offset=offset, prefix=prefix, extend=extend, mm=mm: _fix_chunk_positions(
                    forward_batch.mrope_positions, offset, prefix, extend, mm),
                lambda: None, instead="the provisional positions")
    return result


def _fix_chunk_positions(positions: torch.Tensor, offset: int, prefix: int, extend: int, mm) -> None:
    """Write the original positions of kept tokens whose slots fall in [prefix, prefix + extend)."""
    for item in mm.mm_items:
        orig = item.model_specific_data.get(POS_KEY)
        if orig is None:
            continue
        (start, end), = item.offsets
        lo, hi = max(start, prefix), min(end + 1, prefix + extend)
        if lo >= hi:
            continue
        keep = _keep_for(item)
        local = keep[lo - start:hi - start]                              # kept token ids for these slots
        positions[:, offset + lo - prefix:offset + hi - prefix] = orig[:, local].to(positions.device,
                                                                                    positions.dtype)
