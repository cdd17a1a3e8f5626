"""What IDPruner's and Samp's SGLang hooks share.

Both features work the same way around SGLang's multimodal path: in the tokenizer process each chosen item's run
of N placeholders shrinks to K (the run keeps its first K slots, the rest of the run is dropped and every later
offset shifts left), the item's hash mixes in the feature's settings so SGLang's radix and embedding caches never
mix shrunk and whole items (nor two settings), and in the scheduler the feature returns exactly K rows per run.

- :func:`placeholder_runs` and :func:`drop_placeholders`: the shrinking, given K per run;
- :func:`mark_shrunk` (with :func:`hash_settings`): the settings hash, and the item's token count before
  shrinking for the metrics;
- :class:`FeatureHooks`: a feature's settings in this process and its hooks, registered once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from sgl_slim.config import SlimConfig
from sgl_slim.integration.metrics import TOKENS_BEFORE_KEY

# in the HOOKED_SYMBOLS of each feature that uses this module
HOOKED_SYMBOLS: list[str] = [
    "sglang.srt.managers.schedule_batch.MultimodalDataItem.set_hash",
    "sglang.srt.managers.schedule_batch.MultimodalProcessorOutput.build_padded_input_ids",
    "sglang.srt.multimodal.cache.identity.resolve_multimodal_item_hash",
    "sglang.srt.plugins.hook_registry.HookRegistry.register",
]


class FeatureHooks:
    """One feature's hooks in this process: its settings (``cfg``, replaced by every install) and its SGLang
    hooks, registered once, and only when the feature is on.

    ``hooks`` returns ``(dotted target, hook function, HookType name)`` for each hook; it is called at the first
    install that registers, so a module may build this object before it defines its hook functions."""

    def __init__(self, section: str, hooks: Callable[[], list[tuple[str, Callable, str]]]):
        self.section = section            # the feature's section of SlimConfig
        self.cfg = None                   # its settings in this process, set by install()
        self._hooks = hooks
        self._registered = False

    def install(self, cfg: SlimConfig) -> None:
        """Keep the settings and register the hooks (idempotent; runs in every SGLang process)."""
        self.cfg = getattr(cfg, self.section)
        if self._registered or not self.cfg.enabled:
            return
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

        for target, hook, kind in self._hooks():
            HookRegistry.register(target, hook, getattr(HookType, kind))
        self._registered = True

    @property
    def on(self) -> bool:
        return self.cfg is not None and self.cfg.enabled


# -------------------------------------------------------------------------------------------------------------
# Tokenizer process: shrinking a MultimodalProcessorOutput
# -------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run of placeholders of an item, in the sequence SGLang built."""
    start: int          # first slot
    end: int            # last slot (inclusive)
    item: object        # its MultimodalDataItem
    index: int          # which of the item's runs (its place in item.offsets)
    keep: int           # K: the slots it keeps (N when the feature leaves the run whole)

    @property
    def n(self) -> int:
        return self.end - self.start + 1


def placeholder_runs(out, keep_count: Callable[[object, int], int | None]) -> list[Run]:
    """Every placeholder run of ``out``'s items in sequence order, each with K = ``keep_count(item, N)`` (None: the
    run stays whole)."""
    runs = []
    for item in out.mm_items:
        for r, (start, end) in enumerate(item.offsets or []):
            k = keep_count(item, end - start + 1)
            runs.append(Run(start, end, item, r, end - start + 1 if k is None else k))
    runs.sort(key=lambda run: run.start)
    return runs


def drop_placeholders(out, runs: list[Run]) -> list[int]:
    """Shrink every run of ``out`` to its K slots, in place: the input ids (each run keeps its first K) and every
    item's offsets. Returns the columns of the old sequence that survive, in order (for per-column data)."""
    new_offsets = {id(item): list(item.offsets or []) for item in out.mm_items}
    cols: list[int] = []
    cursor, dropped = 0, 0
    for run in runs:
        cols += range(cursor, run.start + run.keep)
        cursor = run.end + 1
        new_offsets[id(run.item)][run.index] = (run.start - dropped, run.start - dropped + run.keep - 1)
        dropped += run.n - run.keep
    ids = list(out.input_ids)
    cols += range(cursor, len(ids))
    out.input_ids = [ids[c] for c in cols]
    for item in out.mm_items:
        item.offsets = new_offsets[id(item)]
    return cols


def hash_settings(tag: str, base: int, *settings: str) -> int:
    """64-bit hash of (a feature's version tag, an item hash, the feature's settings written as text)."""
    text = "|".join([tag, str(base), *settings]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def mark_shrunk(item, tokens_before: int, settings_hash: Callable[[int], int]) -> None:
    """Record on ``item`` that its placeholders were shrunk: its token count before (for the per-request
    metrics) and ``settings_hash(item hash)`` as its hash (SGLang's hash of its features when it has none yet)."""
    item.model_specific_data[TOKENS_BEFORE_KEY] = tokens_before
    base = item.hash
    if base is None:
        from sglang.srt.multimodal.cache.identity import resolve_multimodal_item_hash  # noqa: PLC0415
        base = resolve_multimodal_item_hash(feature=item.feature)
    item.set_hash(settings_hash(base))


def rebuild_padded_input_ids(out) -> None:
    """SGLang's padded input ids again, from the shrunk ids and the new pad values (when it had built them)."""
    if out.padded_input_ids is not None:
        from sglang.srt.managers.schedule_batch import MultimodalProcessorOutput  # noqa: PLC0415
        out.padded_input_ids = MultimodalProcessorOutput.build_padded_input_ids(out.input_ids, out.mm_items)
