"""Per-request settings inside SGLang: a request's ``sgl_slim`` object, checked, carried and read back.

Installed in every process of a server started by ``python -m sgl_slim.launch``. The object and its rules are
:mod:`sgl_slim.request_settings`; here is how it travels (no SGLang file changed):

1. HTTP entry, tokenizer process. SGLang's request models drop unknown top-level fields, so the object is read
   from the raw JSON body (Starlette keeps it). ``http_server.serve_generate_request`` (``/generate``) and
   ``OpenAIServingBase.handle_request`` (``/v1/chat/completions``, ``/v1/completions``; ``extra_body`` puts the
   object at the top level) are wrapped (AROUND) to answer a bad object with HTTP 400 before any work starts,
   streaming or not.
2. ``TokenizerManager.generate_request`` (AROUND, every generation request) writes the checked settings into
   each of the request's sampling params as ``custom_params["__sgl_slim"]``: SGLang's own per-request carrier
   (its reasoning parser rides there too), which reaches the multimodal processor (``request_obj``) and the
   scheduler's ``Req.sampling_params``, through batching, parallel sampling and retraction. Settings a caller put
   in ``custom_params`` itself (the offline ``Engine``) are checked the same way. A request without any is not
   touched at all.
3. Readers: IDPruner's and Samp's processor hooks (:func:`settings_of_request`: the request's keep ratio picks K
   and is mixed into the item hash, so the radix and embedding caches never share an item between two
   settings), the metrics, which echo the settings in ``meta_info["sgl_slim"]`` (:func:`settings_of_req`),
   and the S2O backend, which sees a forward batch's request ids only: ``Scheduler._add_request_to_queue``
   (BEFORE, scheduler process) files the settings of each request that has any under its rid
   (:data:`SCHEDULED`, bounded, dropped when the request finishes) and :func:`s2o_taus` reads them per batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from sgl_slim.config import SlimConfig
from sgl_slim.request_settings import (BODY_KEY, CARRIER_KEY, RequestSettings, RequestSettingsError,
                                       parse_request_settings, settings_from_custom_params)

_GENERATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request"
_SERVE_GENERATE = "sglang.srt.entrypoints.http_server.serve_generate_request"
_OPENAI_HANDLE = "sglang.srt.entrypoints.openai.serving_base.OpenAIServingBase.handle_request"
_ADD_TO_QUEUE = "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue"

HOOKED_SYMBOLS: list[str] = [
    _GENERATE,
    _SERVE_GENERATE,
    _OPENAI_HANDLE,
    _ADD_TO_QUEUE,
    "sglang.srt.entrypoints.http_server._create_error_response",
    "sglang.srt.entrypoints.openai.serving_base.OpenAIServingBase.create_error_response",
    "sglang.srt.managers.io_struct.GenerateReqInput",
    "sglang.srt.sampling.sampling_params.SamplingParams",     # its custom_params carry the settings
    "sglang.srt.managers.schedule_batch.Req",                 # Req.sampling_params in the scheduler
    "sglang.srt.plugins.hook_registry.HookRegistry.register",
]

_CFG: SlimConfig | None = None
_REGISTERED = False


def install(cfg: SlimConfig) -> None:
    """Register the four hooks (idempotent; every SGLang process of a launched server)."""
    global _CFG, _REGISTERED
    _CFG = cfg
    if _REGISTERED:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    HookRegistry.register(_GENERATE, _generate_request_around, HookType.AROUND)
    HookRegistry.register(_SERVE_GENERATE, _serve_generate_request_around, HookType.AROUND)
    HookRegistry.register(_OPENAI_HANDLE, _handle_request_around, HookType.AROUND)
    HookRegistry.register(_ADD_TO_QUEUE, _add_request_to_queue_before, HookType.BEFORE)
    _REGISTERED = True


# -------------------------------------------------------------------------------------------------------------
# Tokenizer process: the object, checked and carried
# -------------------------------------------------------------------------------------------------------------

async def body_object(request):
    """The ``sgl_slim`` field of an HTTP request's JSON body, or None (no such field, no HTTP request)."""
    from starlette.requests import Request  # noqa: PLC0415

    if not isinstance(request, Request):
        return None
    try:
        body = await request.json()          # parsed once by the endpoint already; Starlette keeps the body
    except Exception:    # not a JSON body (SGLang read it some other way): it carries no object
        return None
    return body.get(BODY_KEY) if isinstance(body, dict) else None


def apply_settings(obj, value, cfg: SlimConfig) -> None:
    """Check the request's object ``value`` (None: none) and write it into every sampling-params dict of
    ``obj`` (a GenerateReqInput) as ``custom_params[CARRIER_KEY]``; with no object, settings already in
    ``custom_params`` are checked the same way. Raises RequestSettingsError (HTTP 400). A request with neither is
    left untouched."""
    params = obj.sampling_params
    many = isinstance(params, list)
    out = []
    for sp in (params if many else [params]):
        custom = sp.get("custom_params") if isinstance(sp, dict) else None
        carried = custom.get(CARRIER_KEY) if isinstance(custom, dict) else None
        if value is None and carried is None:
            out.append(sp)
            continue
        settings = parse_request_settings(value if value is not None else carried, cfg)
        if (sp is not None and not isinstance(sp, dict)) or (custom is not None and not isinstance(custom, dict)):
            raise RequestSettingsError(f"{BODY_KEY}: sampling_params and its custom_params must be JSON objects "
                                       f"in a request that carries {BODY_KEY}")
        new_custom = {k: v for k, v in (custom or {}).items() if k != CARRIER_KEY}
        if settings:
            new_custom[CARRIER_KEY] = settings.to_dict()
        out.append({**(sp or {}), "custom_params": new_custom or None})
    obj.sampling_params = out if many else out[0]


def settings_of_request(obj) -> RequestSettings:
    """The settings of a GenerateReqInput for ONE prompt (what the multimodal processor gets as ``request_obj``)."""
    params = getattr(obj, "sampling_params", None)
    if isinstance(params, dict):
        return settings_from_custom_params(params.get("custom_params"))
    return RequestSettings()


def settings_of_req(req) -> RequestSettings:
    """The settings of a scheduler ``Req``."""
    return settings_from_custom_params(getattr(getattr(req, "sampling_params", None), "custom_params", None))


def _is_generate(obj) -> bool:
    from sglang.srt.managers.io_struct import GenerateReqInput  # noqa: PLC0415
    return isinstance(obj, GenerateReqInput)


async def _generate_request_around(original, self, obj, *args, **kwargs):
    if _CFG is not None and _is_generate(obj):
        request = args[0] if args else kwargs.get("request")
        apply_settings(obj, await body_object(request), _CFG)
    gen = original(self, obj, *args, **kwargs)
    try:
        async for out in gen:
            yield out
    finally:
        await gen.aclose()


async def _serve_generate_request_around(original, obj, request, *args, **kwargs):
    error = await _object_error(request)
    if error is not None:
        from sglang.srt.entrypoints.http_server import _create_error_response  # noqa: PLC0415
        return _create_error_response(error)
    return await original(obj, request, *args, **kwargs)


async def _handle_request_around(original, self, request, raw_request=None, *args, **kwargs):
    error = await _object_error(raw_request)
    if error is not None:
        return self.create_error_response(str(error), err_type="BadRequest", status_code=400)
    return await original(self, request, raw_request, *args, **kwargs)


async def _object_error(request) -> RequestSettingsError | None:
    """The 400 for a bad ``sgl_slim`` object in an HTTP request's body, or None."""
    if _CFG is None:
        return None
    try:
        parse_request_settings(await body_object(request), _CFG)
    except RequestSettingsError as exc:
        return exc
    return None


# -------------------------------------------------------------------------------------------------------------
# Scheduler process: the settings of queued requests, by rid (for the S2O backend)
# -------------------------------------------------------------------------------------------------------------

class SettingsByRid:
    """rid -> RequestSettings of the scheduler's requests that carry settings; bounded (oldest dropped first),
    so a request that never reports finishing cannot grow it without limit."""

    def __init__(self, max_rids: int = 1 << 16):
        self.max_rids = max_rids
        self._data: OrderedDict[str, RequestSettings] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, rid: str, settings: RequestSettings) -> None:
        with self._lock:
            self._data[rid] = settings
            self._data.move_to_end(rid)
            while len(self._data) > self.max_rids:
                self._data.popitem(last=False)

    def get(self, rid) -> RequestSettings | None:
        return self._data.get(rid) if self._data else None

    def pop(self, rid) -> None:
        if self._data:
            with self._lock:
                self._data.pop(rid, None)

    def __len__(self) -> int:
        return len(self._data)


SCHEDULED = SettingsByRid()


def _add_request_to_queue_before(self, req, *args, **kwargs):
    settings = settings_of_req(req)
    if settings:
        SCHEDULED.put(req.rid, settings)


def s2o_taus(rids) -> tuple[float | None, ...] | None:
    """Per sequence of a forward batch (by rid): its request's own S2O tau (0.0: dense), None where it has
    none; None when no sequence has one (the batch runs as without settings)."""
    if not rids or not len(SCHEDULED):
        return None
    taus = []
    for rid in rids:
        settings = SCHEDULED.get(rid)
        taus.append(None if settings is None else settings.s2o_tau_for(None))
    return tuple(taus) if any(t is not None for t in taus) else None
