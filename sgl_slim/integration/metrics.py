"""Per-request sgl_slim numbers: returned with the response and, with ``--enable-metrics``, exported to Prometheus.

Installed in every SGLang process whenever any sgl_slim feature is on (with none on, nothing here runs and no
response changes). What a finished request reports, under ``meta_info["sgl_slim"]`` (only the fields that apply;
each feature's fields are named in the feature table, ``sgl_slim.config.FEATURES``):

- ``s2o_density`` (float), ``s2o_sparse`` (bool): with ``--s2o``, the fraction of causal score blocks S2O
  visited over the request's whole prefill (the per-chunk densities S2O logs, weighted by causal query-key
  pairs; a request shorter than ``--s2o-min-length`` is served dense: 1.0 and ``s2o_sparse`` false).
- ``vision_tokens_kept`` / ``vision_tokens_total`` (int): with ``--idpruner``, image and video tokens the LLM
  saw / those the request had before pruning (summed over its images and videos).
- ``audio_tokens_kept`` / ``audio_tokens_total`` (int): with ``--samp``, likewise for audio clips.
- ``draft_tokens_proposed`` / ``draft_tokens_accepted`` (int): with speculative decoding, SGLang's own
  ``spec_num_proposed_drafts`` (verifies x (draft tokens per verify - 1)) and ``spec_num_correct_drafts``
  under stable names (0 and 0 when the request never reached a verify).
- ``idpruner_keep_ratio``, ``samp_keep_ratio``, ``s2o_tau``, ``s2o``: the request's own settings (its
  ``sgl_slim`` object, :mod:`sgl_slim.request_settings`), echoed as applied; absent when it sent none.

Where the numbers come from, and how they travel (SGLang's customized-info seam, no SGLang file changed):

1. Scheduler process. ``Scheduler.get_output_streamer_class`` (AROUND) returns a subclass of SGLang's
   ``SchedulerOutputStreamer`` with ``has_additional_customized_info``; its ``build_additional_customized_info``
   adds, for each request that finishes in this output batch, one ``{"sgl_slim": [numbers]}`` entry (nothing at
   all for batches where no request finishes, so the per-token path is untouched). Image / audio counts are
   read from the request's multimodal items (the tokenizer-side hooks shrank each placeholder run to K and left
   the item's original token count under :data:`TOKENS_BEFORE_KEY` in ``model_specific_data``; the scheduler-side
   hooks return exactly K rows per run). S2O
   densities come from :func:`record_s2o` (called by the S2O backend per request and forward, kept per rid
   until the request finishes; bounded). Draft counts are the request's own ``spec_verify_ct`` /
   ``spec_num_correct_drafts``.
2. Tokenizer process. ``TokenizerManager.update_request_meta_info`` (AROUND) takes our key out of the
   customized info (SGLang would accumulate it into a list and slice it while streaming), puts the dict in
   ``meta_info["sgl_slim"]`` and, with ``--enable-metrics``, observes the Prometheus series once per finished
   request. ``build_endpoint_weight_version_metadata`` (AFTER) copies the dict into the ``metadata`` object of
   non-streaming ``/v1/chat/completions`` and ``/v1/completions`` responses.

Prometheus series (tokenizer process; SGLang's multiprocess collector serves them on ``/metrics``), each with
SGLang's ``model_name`` label: ``sgl_slim_requests_total{feature}`` (feature = s2o | vision | audio | draft),
``sgl_slim_s2o_density{mode}`` (histogram, mode = sparse | dense), ``sgl_slim_vision_tokens_total{kind}``,
``sgl_slim_audio_tokens_total{kind}`` (kind = kept | original), ``sgl_slim_draft_tokens_total{kind}``
(kind = proposed | accepted); from the scheduler, ``sgl_slim_s2o_pending_requests`` (S2O numbers held for
unfinished requests, updated as requests finish: 0 when idle); from either, ``sgl_slim_fallbacks_total{feature,
reason}`` (items served by a fallback, see sgl_slim/integration/containment.py).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from sgl_slim.config import SlimConfig, feature
from sgl_slim.integration.request_hooks import SCHEDULED, settings_of_req

logger = logging.getLogger("sgl_slim.metrics")

KEY = "sgl_slim"          # the meta_info / customized-info / response-metadata key

# The fields each feature reports per request, named in the feature table (sgl_slim.config.FEATURES).
S2O_DENSITY, S2O_SPARSE = feature("s2o").metric_fields
VISION_KEPT, VISION_TOTAL = feature("idpruner").metric_fields
AUDIO_KEPT, AUDIO_TOTAL = feature("samp").metric_fields
DRAFT_PROPOSED, DRAFT_ACCEPTED = feature("eagle").metric_fields

# model_specific_data key where a multimodal feature's tokenizer-side hook leaves the tokens an item had before it
# shrank the item's placeholders (sgl_slim.integration.mm_hooks.mark_shrunk); absent: the item was not shrunk.
TOKENS_BEFORE_KEY = "sgl_slim_tokens_before"

_GET_STREAMER = "sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class"
_STREAMER = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
_UPDATE_META = "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info"
_ENDPOINT_METADATA = "sglang.srt.utils.weight_versions.build_endpoint_weight_version_metadata"

HOOKED_SYMBOLS: list[str] = [
    _GET_STREAMER,
    _STREAMER,
    f"{_STREAMER}.has_additional_customized_info",
    f"{_STREAMER}.build_additional_customized_info",
    f"{_STREAMER}.should_build_additional_customized_info",
    f"{_STREAMER}.is_request_level_customized_info_key",
    _UPDATE_META,
    _ENDPOINT_METADATA,
    "sglang.srt.entrypoints.openai.serving_chat.build_endpoint_weight_version_metadata",
    "sglang.srt.entrypoints.openai.serving_completions.build_endpoint_weight_version_metadata",
    "sglang.srt.managers.schedule_batch.Req.finished",
    "sglang.srt.managers.schedule_batch.MultimodalDataItem.is_image",
    "sglang.srt.managers.schedule_batch.MultimodalDataItem.is_video",
    "sglang.srt.managers.schedule_batch.MultimodalDataItem.is_audio",
    "sglang.srt.plugins.hook_registry.HookRegistry.register",
    "sglang.srt.runtime_context.get_serving",
]

S2O_DENSITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

_CFG: SlimConfig | None = None
_REGISTERED = False
_STREAMER_CLASSES: dict[type, type] = {}


def install(cfg: SlimConfig) -> None:
    """Register the hooks (idempotent; every SGLang process). Does nothing unless some feature is on."""
    global _CFG, _REGISTERED
    _CFG = cfg
    S2O_TABLE.enabled = cfg.s2o.enabled
    if _REGISTERED or not cfg.enabled_features():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    HookRegistry.register(_GET_STREAMER, _get_output_streamer_class_around, HookType.AROUND)
    HookRegistry.register(_UPDATE_META, _update_request_meta_info_around, HookType.AROUND)
    HookRegistry.register(_ENDPOINT_METADATA, _endpoint_metadata_after, HookType.AFTER)
    _REGISTERED = True


# -------------------------------------------------------------------------------------------------------------
# Scheduler process: what each request did
# -------------------------------------------------------------------------------------------------------------

class S2OTable:
    """Per-rid S2O density accumulator (scheduler process), emptied as requests finish.

    Bounded: a rid that never finishes through the output streamer (it should not happen) is evicted oldest
    first once ``max_rids`` are held, so the table cannot grow without limit.
    """

    def __init__(self, max_rids: int = 1 << 16):
        self.enabled = False
        self.max_rids = max_rids
        self.evicted = 0
        self._data: OrderedDict[str, list] = OrderedDict()   # rid -> [sum density * pairs, sum pairs, sparse?]
        self._lock = threading.Lock()

    def add(self, rid: str | None, kv_len: int, q_len: int, density: float, sparse: bool) -> None:
        if not self.enabled or rid is None or q_len <= 0:
            return
        pairs = q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2
        with self._lock:
            entry = self._data.get(rid)
            if entry is None:
                entry = self._data[rid] = [0.0, 0.0, False]
                while len(self._data) > self.max_rids:
                    old, _ = self._data.popitem(last=False)
                    if not self.evicted:
                        logger.warning("sgl_slim: S2O numbers of request %s dropped: %d requests hold S2O numbers "
                                       "but none finished (a request left the scheduler unseen?)", old, self.max_rids)
                    self.evicted += 1
            entry[0] += density * pairs
            entry[1] += pairs
            entry[2] = entry[2] or sparse

    def pop(self, rid: str) -> dict | None:
        with self._lock:
            entry = self._data.pop(rid, None)
        if entry is None or entry[1] <= 0:
            return None
        return {S2O_DENSITY: entry[0] / entry[1], S2O_SPARSE: bool(entry[2])}

    def __len__(self) -> int:
        return len(self._data)


S2O_TABLE = S2OTable()


def record_s2o(rid: str | None, kv_len: int, q_len: int, density: float, sparse: bool) -> None:
    """Called by the S2O backend once per request and forward (the numbers it logs)."""
    S2O_TABLE.add(rid, kv_len, q_len, density, sparse)


def _runs(item) -> int:
    return sum(end - start + 1 for start, end in (item.offsets or []))


def _token_counts(items, counted) -> tuple[int, int]:
    """(kept, original) tokens over the items for which ``counted(item)``: kept = their placeholders now."""
    kept = total = 0
    for item in items:
        if not counted(item):
            continue
        k = _runs(item)
        kept += k
        total += int(item.model_specific_data.get(TOKENS_BEFORE_KEY, k))   # set only where the runs were shrunk
    return kept, total


def vision_token_counts(items) -> tuple[int, int]:
    """(kept, original) image and video tokens over a request's multimodal items (after IDPruner's tokenizer
    hook)."""
    return _token_counts(items, lambda item: item.is_image() or item.is_video())


def audio_token_counts(items) -> tuple[int, int]:
    """(kept, original) audio tokens over a request's multimodal items (after Samp's tokenizer hook)."""
    return _token_counts(items, lambda item: item.is_audio())


def request_numbers(req, cfg: SlimConfig, draft_tokens_per_verify: int | None) -> dict:
    """The sgl_slim numbers of one finished scheduler ``Req`` (only the fields that apply)."""
    out: dict = {}
    if cfg.s2o.enabled:
        s2o = S2O_TABLE.pop(req.rid)
        if s2o is not None:
            out.update(s2o)
    mm = getattr(req, "multimodal_inputs", None)
    items = list(getattr(mm, "mm_items", None) or []) if mm is not None else []
    if cfg.idpruner.enabled and items:
        kept, total = vision_token_counts(items)
        if total:
            out[VISION_KEPT], out[VISION_TOTAL] = kept, total
    if cfg.samp.enabled and items:
        kept, total = audio_token_counts(items)
        if total:
            out[AUDIO_KEPT], out[AUDIO_TOTAL] = kept, total
    if draft_tokens_per_verify:
        out[DRAFT_PROPOSED] = int(req.spec_verify_ct) * (draft_tokens_per_verify - 1)
        out[DRAFT_ACCEPTED] = int(req.spec_num_correct_drafts)
    out.update(settings_of_req(req).to_dict())          # the request's own settings, echoed
    SCHEDULED.pop(req.rid)                              # finished: the S2O backend needs them no more
    return out


def _draft_tokens_per_verify(streamer) -> int | None:
    spec = getattr(streamer, "spec_algorithm", None)
    if spec is None or spec.is_none():
        return None
    return getattr(streamer.server_args, "speculative_num_draft_tokens", None) or None


def streamer_class(base: type) -> type:
    """``base`` (SGLang's SchedulerOutputStreamer or a subclass) plus the sgl_slim request-level field."""
    cls = _STREAMER_CLASSES.get(base)
    if cls is not None:
        return cls
    base_builds = bool(getattr(base, "has_additional_customized_info", False))

    class SlimOutputStreamer(base):
        has_additional_customized_info = True

        def should_build_additional_customized_info(self) -> bool:
            return True

        def build_additional_customized_info(self, reqs):
            extra = {}
            if base_builds and super().should_build_additional_customized_info():
                extra = dict(super().build_additional_customized_info(reqs))
            if _CFG is None:
                return extra
            per_draft = _draft_tokens_per_verify(self)
            values, any_numbers = [], False
            for req in reqs:
                numbers = request_numbers(req, _CFG, per_draft) if req.finished() else None
                values.append([numbers] if numbers else [])
                any_numbers = any_numbers or bool(numbers)
            if any_numbers and getattr(self.server_args, "enable_metrics", False):
                PROMETHEUS.set_s2o_pending(len(S2O_TABLE), _served_model_name(self.server_args))
            if any_numbers:
                if KEY in extra:
                    raise ValueError(f"customized_info key {KEY!r} is already used by {base.__name__}")
                extra[KEY] = values
            return extra

        def is_request_level_customized_info_key(self, key: str) -> bool:
            return key == KEY or super().is_request_level_customized_info_key(key)

    SlimOutputStreamer.__qualname__ = SlimOutputStreamer.__name__ = f"Slim{base.__name__}"
    _STREAMER_CLASSES[base] = SlimOutputStreamer
    return SlimOutputStreamer


def _get_output_streamer_class_around(original, self, *args, **kwargs):
    base = original(self, *args, **kwargs)
    if getattr(self, "rust_server", None) is not None:
        # SGLang refuses customized output with its Rust egress; serve without sgl_slim's per-request numbers.
        logger.warning("sgl_slim: SGLANG_RUST_SERVER is on: per-request sgl_slim numbers are not returned")
        return base
    return streamer_class(base)


# -------------------------------------------------------------------------------------------------------------
# Tokenizer process: into meta_info, Prometheus, and the OpenAI responses' metadata
# -------------------------------------------------------------------------------------------------------------

def _update_request_meta_info_around(original, self, meta_info, state, customized_info, index, finish_reason):
    values = customized_info.get(KEY) if customized_info else None
    if values is None:
        return original(self, meta_info, state, customized_info, index, finish_reason)
    rest = {k: v for k, v in customized_info.items() if k != KEY}
    result = original(self, meta_info, state, rest, index, finish_reason) if rest else None
    mine = values[index]
    if mine:
        numbers = dict(mine[-1])
        meta_info[KEY] = numbers
        if getattr(self, "enable_metrics", False) and getattr(state.obj, "log_metrics", True):
            try:
                PROMETHEUS.observe(numbers, _model_name(self))
            except Exception:   # metrics must never fail a response
                logger.exception("sgl_slim: recording Prometheus metrics failed")
    return result


def _model_name(tokenizer_manager) -> str:
    return _served_model_name(getattr(tokenizer_manager, "server_args", None))


def _served_model_name(server_args) -> str:
    """SGLang's ``model_name`` label: the served model name from its runtime context (as its own collectors)."""
    try:
        from sglang.srt.runtime_context import get_serving  # noqa: PLC0415
        name = get_serving().served_model_name
    except Exception:      # context not published (unit tests): the server arguments
        name = None
    return str(name or getattr(server_args, "served_model_name", None) or getattr(server_args, "model_path", "")
               or "")


def _endpoint_metadata_after(result, meta_info, *args, **kwargs):
    if isinstance(result, dict) and isinstance(meta_info, dict) and KEY in meta_info:
        result[KEY] = meta_info[KEY]
    return result


class PrometheusSeries:
    """sgl_slim's series, created on first use (prometheus_client must be imported after SGLang sets
    PROMETHEUS_MULTIPROC_DIR, which happens after plugins load)."""

    def __init__(self):
        self._made = None
        self._pending = None
        self._fallbacks = None
        self._lock = threading.Lock()

    def set_s2o_pending(self, n: int, model_name: str) -> None:
        """Scheduler process: S2O entries held for requests not finished yet (0 when idle; a leak shows here)."""
        with self._lock:
            if self._pending is None:
                from prometheus_client import Gauge  # noqa: PLC0415
                self._pending = Gauge("sgl_slim_s2o_pending_requests", "Requests whose S2O numbers the scheduler "
                                      "holds until they finish (0 when idle).", ["model_name"],
                                      multiprocess_mode="livesum")
        self._pending.labels(model_name).set(n)

    def count_fallback(self, feature: str, reason: str, model_name: str) -> None:
        """Any process: one item served without its feature's selection (sgl_slim/integration/containment.py)."""
        with self._lock:
            if self._fallbacks is None:
                from prometheus_client import Counter  # noqa: PLC0415
                self._fallbacks = Counter("sgl_slim_fallbacks", "Items (an image, an audio clip) whose sgl_slim "
                                          "processing failed and that were served by the fallback, by feature "
                                          "(vision, audio) and reason (nonfinite, empty, error).",
                                          ["model_name", "feature", "reason"])
        self._fallbacks.labels(model_name, feature, reason).inc()

    def _series(self):
        with self._lock:
            if self._made is None:
                from prometheus_client import Counter, Histogram  # noqa: PLC0415

                self._made = {
                    "requests": Counter("sgl_slim_requests", "Finished requests that reported sgl_slim numbers, "
                                        "by feature (s2o, vision, audio, draft).", ["model_name", "feature"]),
                    "s2o": Histogram("sgl_slim_s2o_density", "S2O prefill density per request (fraction of causal "
                                     "score blocks visited); mode=dense: shorter than --s2o-min-length.",
                                     ["model_name", "mode"], buckets=S2O_DENSITY_BUCKETS),
                    "vision": Counter("sgl_slim_vision_tokens", "Image and video tokens per request before IDPruner "
                                      "(kind=original) and after (kind=kept).", ["model_name", "kind"]),
                    "audio": Counter("sgl_slim_audio_tokens", "Audio tokens per request before Samp "
                                     "(kind=original) and after (kind=kept).", ["model_name", "kind"]),
                    "draft": Counter("sgl_slim_draft_tokens", "Speculative draft tokens proposed and accepted.",
                                     ["model_name", "kind"]),
                }
            return self._made

    def observe(self, numbers: dict, model_name: str) -> None:
        s = self._series()
        if S2O_DENSITY in numbers:
            s["requests"].labels(model_name, "s2o").inc()
            mode = "sparse" if numbers.get(S2O_SPARSE) else "dense"
            s["s2o"].labels(model_name, mode).observe(float(numbers[S2O_DENSITY]))
        for label, kept, total in (("vision", VISION_KEPT, VISION_TOTAL), ("audio", AUDIO_KEPT, AUDIO_TOTAL)):
            if total in numbers:
                s["requests"].labels(model_name, label).inc()
                s[label].labels(model_name, "original").inc(numbers[total])
                s[label].labels(model_name, "kept").inc(numbers[kept])
        if DRAFT_PROPOSED in numbers:
            s["requests"].labels(model_name, "draft").inc()
            s["draft"].labels(model_name, "proposed").inc(numbers[DRAFT_PROPOSED])
            s["draft"].labels(model_name, "accepted").inc(numbers[DRAFT_ACCEPTED])


PROMETHEUS = PrometheusSeries()
