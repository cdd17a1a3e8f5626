"""sgl_slim.integration.request_hooks against SGLang's own request classes (no server): a request's ``sgl_slim``
object is read from the HTTP body, refused with a 400 when bad, carried in custom_params to every prompt of the
request, and read back by IDPruner's processor hook (K and the item hash follow the request's keep ratio)."""

import asyncio
import json

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.managers.io_struct import EmbeddingReqInput, GenerateReqInput  # noqa: E402
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalProcessorOutput  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from starlette.requests import Request  # noqa: E402

from sgl_slim.config import IDPrunerConfig, S2OConfig, SampConfig, SlimConfig  # noqa: E402
from sgl_slim.integration import idpruner_hooks, request_hooks  # noqa: E402
from sgl_slim.request_settings import CARRIER_KEY, RequestSettings, RequestSettingsError  # noqa: E402

CFG = SlimConfig(idpruner=IDPrunerConfig(enabled=True, keep_ratio=0.25), samp=SampConfig(enabled=True),
                 s2o=S2OConfig(enabled=True))


def http_request(body) -> Request:
    """A Starlette request whose body is ``body`` as JSON (what SGLang's endpoints receive)."""
    raw = json.dumps(body).encode()
    sent = []

    async def receive():
        sent.append(1)
        return {"type": "http.request", "body": raw if len(sent) == 1 else b"", "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/generate", "headers": []}, receive)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def cfg(monkeypatch):
    monkeypatch.setattr(request_hooks, "_CFG", CFG)
    return CFG


def test_body_object_is_read_from_the_json_body_only():
    assert run(request_hooks.body_object(http_request({"text": "hi", "sgl_slim": {"s2o": False}}))) == {"s2o": False}
    assert run(request_hooks.body_object(http_request({"text": "hi"}))) is None
    assert run(request_hooks.body_object(http_request(["not", "an", "object"]))) is None
    assert run(request_hooks.body_object(None)) is None
    assert run(request_hooks.body_object(object())) is None            # gRPC and other callers: no body


def test_no_object_leaves_the_request_untouched():
    params = {"temperature": 0, "custom_params": {"mine": 1}}
    obj = GenerateReqInput(text="hi", sampling_params=params)
    request_hooks.apply_settings(obj, None, CFG)
    assert obj.sampling_params is params and params == {"temperature": 0, "custom_params": {"mine": 1}}


@pytest.mark.parametrize("params", [None, {"temperature": 0}, [{"temperature": 0}, {"max_new_tokens": 3}]])
def test_the_object_reaches_every_prompt_of_the_request(params):
    obj = GenerateReqInput(text=["a", "b"] if isinstance(params, list) else "a", sampling_params=params)
    request_hooks.apply_settings(obj, {"idpruner_keep_ratio": 0.5}, CFG)
    obj.normalize_batch_and_arguments()
    prompts = [obj] if obj.is_single else [obj[i] for i in range(obj.batch_size)]
    for one in prompts:
        assert request_hooks.settings_of_request(one) == RequestSettings(idpruner_keep_ratio=0.5)
        sp = SamplingParams(**one.sampling_params)              # what the scheduler's Req holds
        sp.verify(1000)
        assert request_hooks.settings_of_req(type("Req", (), {"sampling_params": sp})()).idpruner_keep_ratio == 0.5
    if isinstance(params, list):                                # the caller's other fields are kept
        assert obj[1].sampling_params["max_new_tokens"] == 3


def test_settings_put_in_custom_params_directly_are_checked_too():
    obj = GenerateReqInput(text="a", sampling_params={"custom_params": {CARRIER_KEY: {"samp_keep_ratio": 1}}})
    request_hooks.apply_settings(obj, None, CFG)
    assert obj.sampling_params["custom_params"][CARRIER_KEY] == {"samp_keep_ratio": 1.0}
    bad = GenerateReqInput(text="a", sampling_params={"custom_params": {CARRIER_KEY: {"samp_keep_ratio": 3}}})
    with pytest.raises(RequestSettingsError, match="sgl_slim.samp_keep_ratio"):
        request_hooks.apply_settings(bad, None, CFG)
    # the body's object replaces what custom_params held
    both = GenerateReqInput(text="a", sampling_params={"custom_params": {CARRIER_KEY: {"samp_keep_ratio": 3}}})
    request_hooks.apply_settings(both, {"s2o": False}, CFG)
    assert both.sampling_params["custom_params"] == {CARRIER_KEY: {"s2o": False}}


def test_generate_hook_applies_the_body_object_then_streams_the_original(cfg):
    seen = []

    async def original(self, obj, request=None):
        seen.append(obj.sampling_params)
        yield {"text": "one"}
        yield {"text": "two"}

    async def collect(obj, request):
        return [out async for out in request_hooks._generate_request_around(original, None, obj, request)]

    obj = GenerateReqInput(text="a", sampling_params={"temperature": 0})
    assert run(collect(obj, http_request({"text": "a", "sgl_slim": {"s2o_tau": 0.01}}))) == [{"text": "one"},
                                                                                            {"text": "two"}]
    assert seen[-1] == {"temperature": 0, "custom_params": {CARRIER_KEY: {"s2o_tau": 0.01}}}
    with pytest.raises(ValueError, match="unknown field 'tau'"):
        run(collect(GenerateReqInput(text="a"), http_request({"sgl_slim": {"tau": 1}})))
    embed = EmbeddingReqInput(text="a")                             # not a generation: passed through as is
    run(collect(embed, http_request({"sgl_slim": {"tau": 1}})))
    assert seen[-1] is embed.sampling_params


def test_openai_and_generate_entries_answer_a_bad_object_with_400(cfg):
    class Serving:
        def create_error_response(self, message, err_type="BadRequestError", status_code=400):
            return ("error", status_code, message)

    async def original(self, request, raw_request):
        return "served"

    bad = http_request({"messages": [], "sgl_slim": {"idpruner_keep_ratio": 0}})
    assert run(request_hooks._handle_request_around(original, Serving(), None, bad)) == (
        "error", 400, "sgl_slim.idpruner_keep_ratio: out of range, as for --idpruner-keep-ratio: keep ratio must be "
        "in (0, 1], got 0.0")
    good = http_request({"messages": [], "sgl_slim": {"idpruner_keep_ratio": 1}})
    assert run(request_hooks._handle_request_around(original, Serving(), None, good)) == "served"

    async def serve(obj, request):
        return "served"

    response = run(request_hooks._serve_generate_request_around(serve, None, http_request({"sgl_slim": [1]})))
    assert response.status_code == 400 and b"sgl_slim must be a JSON object" in response.body
    off = http_request({"sgl_slim": {"samp_keep_ratio": 0.5}})
    request_hooks._CFG = SlimConfig()
    response = run(request_hooks._serve_generate_request_around(serve, None, off))
    assert response.status_code == 400 and b"started without --samp" in response.body
    assert run(request_hooks._serve_generate_request_around(serve, None, http_request({"text": "a"}))) == "served"


# --- IDPruner's processor hook follows the request's keep ratio ---------------------------------------------

PAD, TEXT = 151655, 7


def _vl_output(n=16):
    ids = [TEXT] * 3 + [PAD] * n + [TEXT] * 4
    item = MultimodalDataItem(modality=Modality.IMAGE, feature=torch.ones(4 * n, 8), offsets=[(3, 3 + n - 1)],
                              model_specific_data={"image_grid_thw": torch.tensor([[1, 2, 2 * n]])})
    item.set_hash(1234)
    pos = torch.arange(len(ids)).repeat(3, 1)
    return MultimodalProcessorOutput(input_ids=ids, mm_items=[item], mrope_positions=pos,
                                     mrope_position_delta=torch.tensor([[0]]))


def _shrunk(monkeypatch, settings_object):
    monkeypatch.setattr(idpruner_hooks.HOOKS, "cfg", CFG.idpruner)
    obj = GenerateReqInput(text="a", image_data="x")
    request_hooks.apply_settings(obj, settings_object, CFG)
    obj.normalize_batch_and_arguments()

    async def original(self, *args, **kwargs):
        return _vl_output()

    out = run(idpruner_hooks._process_mm_data_around(original, None, image_data=["x"], input_text="a",
                                                     request_obj=obj))
    (item,) = out.mm_items
    return item.offsets[0][1] - item.offsets[0][0] + 1, item.hash


def test_the_request_keep_ratio_sets_k_and_the_item_hash(monkeypatch):
    k_server, hash_server = _shrunk(monkeypatch, None)
    k_same, hash_same = _shrunk(monkeypatch, {"idpruner_keep_ratio": 0.25})
    k_half, hash_half = _shrunk(monkeypatch, {"idpruner_keep_ratio": 0.5})
    k_all, hash_all = _shrunk(monkeypatch, {"idpruner_keep_ratio": 1.0})
    assert (k_server, k_same, k_half, k_all) == (4, 4, 8, 16)
    assert hash_same == hash_server                      # the server's own setting: the same cache entries
    assert len({hash_server, hash_half, hash_all}) == 3  # another setting never shares an item
    assert hash_all == 1234                              # keep ratio 1.0: the item as stock SGLang built it
