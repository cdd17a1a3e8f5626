"""IDPruner inside SGLang serving (Qwen2.5-VL; Qwen2-VL and Qwen3-VL share the path): each image keeps
K = IDPrunerConfig.keep_count(N) of its N vision tokens, chosen by MMR before LLM layer 0, and the kept tokens
keep their ORIGINAL M-RoPE (t, h, w) positions. A video is pruned per frame group (the frames one temporal patch
covers, ``t`` groups of g = N / t tokens): each group keeps ``keep_count(g, video=True)`` of its own tokens, so
every moment of the video keeps the same share, with the same exact positions. A video's placeholders may be one
run (Qwen2-VL, Qwen2.5-VL) or one run per group (Qwen3-VL, timestamps between them); each run keeps the kept
tokens of the groups it holds.

Three hooks (route proven in shared/SGLANG_NOTES.md), agreeing on K per image:

1. Tokenizer process, async AROUND on ``QwenVLImageProcessor.process_mm_data_async``: each image's run of N
   placeholders shrinks to K (the tail is dropped; later offsets shift). ``mrope_positions`` loses the same
   columns (the K slots keep provisional positions, fixed in step 3); ``mrope_position_delta`` grows by the
   total dropped, so the text after an image and every decode step keep their unpruned positions. The image's
   N, K and original (3, N) positions ride along in ``model_specific_data``; the item hash mixes in the pruning
   settings (``set_hash``), so the radix and embedding caches never mix pruned and unpruned images. The
   shrinking and the hash are shared with Samp (:mod:`sgl_slim.integration.mm_hooks`).
2. Scheduler, AFTER on ``<Model>.get_image_feature`` / ``get_video_feature``: split the vision output per item
   (N = t*h*w / merge^2), select the tokenizer's K rows with :func:`sgl_slim.vision.idpruner_select` (per frame
   group for a video), return only those. The LOCAL keep indices are remembered per item hash (the embedding
   cache skips the vision tower on a hit; a repeated image or video may sit at another offset).
3. Scheduler, AROUND on ``mm_utils.prepare_mm_inputs`` (runs right before the language model, on every
   prefill chunk): overwrite, in place, the positions of this chunk's kept slots in
   ``forward_batch.mrope_positions`` (the tensor the model reads) with the kept tokens' original positions.

keep_ratio 1.0 (K == N for every image and frame group) leaves requests byte-identical to stock SGLang.
Precomputed embeddings, other modalities and a video whose placeholders do not split into its frame groups pass
through untouched.
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
_MODELS = ("sglang.srt.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration",
           "sglang.srt.models.qwen2_vl.Qwen2VLForConditionalGeneration",
           "sglang.srt.models.qwen3_vl.Qwen3VLForConditionalGeneration")
_IMAGE_FEATURE = [f"{model}.get_image_feature" for model in _MODELS]
_VIDEO_FEATURE = [f"{model}.get_video_feature" for model in _MODELS]

HOOKED_SYMBOLS: list[str] = [
    _PROCESSOR,
    _PREPARE,
    *_IMAGE_FEATURE,
    *_VIDEO_FEATURE,
    "sglang.srt.managers.schedule_batch.MultimodalDataItem.is_image",
    "sglang.srt.managers.schedule_batch.MultimodalDataItem.is_video",
    *mm_hooks.HOOKED_SYMBOLS,
]

# model_specific_data keys set by the tokenizer-side hook on each image or video it shrank (N_KEY marks them)
N_KEY = "idpruner_n"                    # int: tokens the item has before pruning
K_KEY = "idpruner_k"                    # int: tokens it keeps (keep_count per image, or per group x groups)
GROUPS_KEY = "idpruner_groups"          # int: frame groups (1 for an image); each keeps K / groups tokens
POS_KEY = "idpruner_positions"          # LongTensor [3, N]: the item's original M-RoPE positions, runs in order
KEEP_KEY = "idpruner_keep"              # LongTensor [K]: local kept indices (set in the scheduler)

# this process's settings (HOOKS.cfg, an IDPrunerConfig) and the three hooks
HOOKS = mm_hooks.FeatureHooks("idpruner", lambda: [
    (_PROCESSOR, _process_mm_data_around, "AROUND"),
    *((target, _get_image_feature_after, "AFTER") for target in _IMAGE_FEATURE),
    *((target, _get_video_feature_after, "AFTER") for target in _VIDEO_FEATURE),
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

def settings_hash(base: int, cfg: IDPrunerConfig, video: bool = False) -> int:
    """64-bit hash of (item hash, pruning settings): a pruned image or video never shares a cache entry with
    another setting or with the unpruned item."""
    return mm_hooks.hash_settings("idpruner-v1", base, repr(cfg.ratio(video)), repr(cfg.mmr_lambda),
                                  str(cfg.min_tokens), cfg.scorer or "", "video" if video else "")


def frame_groups(item) -> int | None:
    """How many frame groups a prunable item's placeholders hold: 1 for an image with one run, the grid's
    ``t`` for a video whose runs each hold whole groups; None for what is left whole (precomputed embeddings,
    other modalities, an image in several runs, a video of several grids or whose runs cut a group)."""
    if item.feature is None or not item.offsets:
        return None
    if item.is_image():
        return 1 if len(item.offsets) == 1 else None
    if not item.is_video() or item.video_grid_thw is None:
        return None
    grid = torch.as_tensor(item.video_grid_thw).reshape(-1, 3)
    groups = int(grid[0, 0]) if grid.shape[0] == 1 else 0
    sizes = [end - start + 1 for start, end in item.offsets]
    if groups < 1 or sum(sizes) % groups:
        return None
    group = sum(sizes) // groups
    return groups if all(size % group == 0 for size in sizes) else None


def shrink_placeholders(out, cfg: IDPrunerConfig):
    """Shrink the placeholder runs of each image and video in a MultimodalProcessorOutput to their kept counts,
    in place.

    Returns ``out``. When no item loses a token (keep ratio 1.0, or tiny images) nothing is touched.
    """
    if out is None or not out.mm_items or out.input_ids is None:
        return out
    groups = {id(item): frame_groups(item) for item in out.mm_items}

    def keep_count(item, n: int) -> int | None:
        g = groups[id(item)]
        if g is None:
            return None
        size = sum(end - start + 1 for start, end in item.offsets) // g      # tokens per group
        return n // size * cfg.keep_count(size, video=item.is_video())

    runs = mm_hooks.placeholder_runs(out, keep_count)
    shrunk = {id(run.item): run.item for run in runs if run.keep < run.n}
    if not shrunk:
        return out                                      # nothing to prune: leave the request as stock
    positions = out.mrope_positions                     # [3, L] or None
    for item in shrunk.values():
        own = [run for run in runs if run.item is item]
        item.model_specific_data[N_KEY] = sum(run.n for run in own)
        item.model_specific_data[K_KEY] = sum(run.keep for run in own)
        item.model_specific_data[GROUPS_KEY] = groups[id(item)]
        if positions is not None:
            item.model_specific_data[POS_KEY] = torch.cat([positions[:, run.start:run.end + 1] for run in own],
                                                          dim=1).clone()
    cols = mm_hooks.drop_placeholders(out, runs)
    if positions is not None:
        out.mrope_positions = positions[:, cols]
    if out.mrope_position_delta is not None:
        out.mrope_position_delta = out.mrope_position_delta + sum(run.n - run.keep for run in runs)
    for item in shrunk.values():
        mm_hooks.mark_shrunk(item, item.model_specific_data[N_KEY],
                             lambda base, video=item.is_video(): settings_hash(base, cfg, video))
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
    return _feature_after(result, self, items, "image")


def _get_video_feature_after(result, self, items, *args, **kwargs):
    return _feature_after(result, self, items, "video")


def _feature_after(result, model, items, kind: str):
    if not HOOKS.on or not any(N_KEY in item.model_specific_data for item in items):
        return None                                     # AFTER hook: None keeps the original result
    # A failure outside the per-item selection (shapes that do not line up) keeps the unpruned rows: SGLang
    # then fits them to the placeholders (with its own warning) instead of the scheduler dying.
    return contain("vision", f"{len(items)} {kind}s", lambda: prune_rows(result, model, items, kind),
                   lambda: None, instead="the unpruned rows")


def per_group(n: int, groups: int, pick) -> torch.Tensor:
    """Local indices over ``n`` rows in ``groups`` equal groups: ``pick(j)`` gives group j's own (sorted)
    indices, shifted here by the group's start."""
    size = n // groups
    return torch.cat([pick(j).cpu() + j * size for j in range(groups)])


def valid_grouped_keep(keep, n: int, groups: int, per: int) -> bool:
    """Whether ``keep`` is sorted distinct indices in ``range(n)`` with exactly ``per`` in each group."""
    if not valid_keep(keep, n, groups * per):
        return False
    return bool((torch.bincount(keep.cpu() // (n // groups), minlength=groups) == per).all())


def prune_rows(result, self, items, kind: str = "image") -> torch.Tensor:
    """The kept rows of ``result`` (get_image_feature's or get_video_feature's [sum N, W]) for ``items``, in
    item order."""
    if not isinstance(result, torch.Tensor) or result.dim() != 2:
        raise RuntimeError(f"idpruner: get_{kind}_feature returned {type(result).__name__} "
                           f"{getattr(result, 'shape', '')}; expected one [tokens, dim] tensor")
    merge = _merge_size(self)
    sizes = [int(torch.as_tensor(getattr(item, f"{kind}_grid_thw")).reshape(-1, 3).prod(dim=1).sum()) // merge ** 2
             for item in items]
    if sum(sizes) != result.shape[0]:
        raise RuntimeError(f"idpruner: vision tower returned {result.shape[0]} rows for {kind}s of "
                           f"{sizes} tokens (merge {merge})")
    width = _llm_width(self)
    pieces = []
    for item, rows in zip(items, torch.split(result, sizes, dim=0)):
        n = item.model_specific_data.get(N_KEY)
        if n is None:
            pieces.append(rows)
            continue
        if n != rows.shape[0]:
            raise RuntimeError(f"idpruner: {kind} has {rows.shape[0]} vision tokens but its placeholders were "
                               f"sized for {n}")
        k, groups = item.model_specific_data[K_KEY], item.model_specific_data.get(GROUPS_KEY, 1)
        per, size = k // groups, n // groups
        keep = contain("vision", f"{kind} of {n} tokens (keep {k})",
                       lambda rows=rows, per=per, size=size, groups=groups: per_group(
                           n, groups, lambda j: select_rows(rows[j * size:(j + 1) * size], per, HOOKS.cfg,
                                                            feature_width=width)),
                       lambda n=n, per=per, size=size, groups=groups: per_group(
                           n, groups, lambda j: evenly_spaced(size, per)),
                       data=rows, valid=lambda kp, n=n, groups=groups, per=per: valid_grouped_keep(kp, n, groups, per))
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
        keep = None
        before = 0                                                       # kept slots in the item's earlier runs
        for start, end in item.offsets:
            lo, hi = max(start, prefix), min(end + 1, prefix + extend)
            if lo < hi:
                keep = _keep_for(item) if keep is None else keep
                local = keep[before + lo - start:before + hi - start]   # kept token ids for these slots
                positions[:, offset + lo - prefix:offset + hi - prefix] = orig[:, local].to(positions.device,
                                                                                            positions.dtype)
            before += end - start + 1
