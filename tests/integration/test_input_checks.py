"""sgl_slim.integration.input_checks against SGLang's own classes (no server): each hook maps exactly the
client mistakes it names to a 400-style error and leaves everything else alone."""

import collections
import io
import re

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sglang.srt.multimodal.processors.base_processor import MultimodalSpecialTokens  # noqa: E402

from sgl_slim.integration import input_checks as ic  # noqa: E402


def _raises_from(cause: BaseException):
    def original(cls, data, modality, *args):
        try:
            raise cause
        except BaseException as exc:  # noqa: BLE001 (re-raised exactly as SGLang does)
            raise RuntimeError(f"Error while loading data {data}: {exc}") from exc
    return original


@pytest.mark.parametrize("cause", [FileNotFoundError(2, "No such file or directory"), IsADirectoryError(21, "dir"),
                                   PermissionError(13, "denied"),
                                   Image.DecompressionBombError("Image size exceeds limit")])
def test_client_media_failures_become_value_errors(cause):
    with pytest.raises(ValueError, match="Error while loading data x.png") as info:
        ic._load_single_item_around(_raises_from(cause), object, "x.png", "IMAGE")
    assert info.value.__cause__ is cause


@pytest.mark.parametrize("cause", [MemoryError(), RuntimeError("CUDA error"), KeyError("x")])
def test_server_side_failures_stay_runtime_errors(cause):
    with pytest.raises(RuntimeError, match="Error while loading data"):
        ic._load_single_item_around(_raises_from(cause), object, "x.png", "IMAGE")


def test_successful_loads_pass_through():
    img = Image.new("RGB", (2, 2))
    assert ic._load_single_item_around(lambda cls, data, m: img, object, "x", "IMAGE") is img


def test_real_bomb_image_is_classified_as_a_client_error():
    """The exception PIL really raises for an over-limit image (not a hand-built one) is recognised."""
    buf = io.BytesIO()
    Image.new("1", (20000, 10000)).save(buf, format="PNG")
    buf.seek(0)
    with pytest.raises(Image.DecompressionBombError) as info:
        Image.open(buf).load()
    assert ic.client_media_error(info.value)
    assert not ic.client_media_error(OSError("disk failure"))


class _Req:
    def __init__(self, **data):
        for m in ic.MODALITIES:
            setattr(self, f"{m}_data", data.get(m))


def test_modalities_come_from_the_processors_placeholder_tokens():
    vl = MultimodalSpecialTokens(image_token="<image>", video_token_id=7)
    audio = MultimodalSpecialTokens(audio_token="<audio>")
    assert ic.accepted_modalities(vl) == ["image", "video"]
    assert ic.accepted_modalities(audio) == ["audio"]
    assert ic.accepted_modalities(None) == []

    assert ic.unsupported_modality_error(_Req(image=["a"]), vl) is None
    msg = ic.unsupported_modality_error(_Req(image=["a"], audio=["b"]), vl)
    assert "does not accept audio" in msg and "image, video" in msg
    msg = ic.unsupported_modality_error(_Req(image=["a"]), audio)
    assert "does not accept image" in msg and "accepts: audio" in msg
    # no declared tokens: SGLang decides (never refuse what we cannot judge)
    assert ic.unsupported_modality_error(_Req(audio=["b"]), MultimodalSpecialTokens()) is None


def test_mm_limits_hook_raises_only_for_refused_modalities():
    class _Proc:
        mm_tokens = MultimodalSpecialTokens(audio_token="<audio>")

    class _TM:
        mm_processor = _Proc()

    assert ic._validate_mm_limits_before(_TM(), _Req(audio=["b"])) is None
    with pytest.raises(ValueError, match="does not accept image"):
        ic._validate_mm_limits_before(_TM(), _Req(image=["a"], audio=["b"]))


class _Chat:
    def __init__(self, top_logprobs):
        self.top_logprobs = top_logprobs


@pytest.mark.parametrize("value, ok", [(None, True), (0, True), (20, True), (-1, False), (21, False)])
def test_top_logprobs_range(value, ok):
    result = ic._validate_request_after(None, object(), _Chat(value))
    assert (result is None) == ok
    if not ok:
        assert "top_logprobs must be between 0 and 20" in result and str(value) in result


def test_an_earlier_validation_error_wins():
    assert ic._validate_request_after("Messages cannot be empty.", object(), _Chat(-1)) == "Messages cannot be empty."


def test_hooks_apply_to_sglangs_classes(monkeypatch):
    """Registered through SGLang's HookRegistry, the checks wrap the real methods (classmethod kept)."""
    from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.multimodal.processors.base_processor import BaseMultimodalProcessor
    from sglang.srt.plugins.hook_registry import HookRegistry

    saved = {c: dict(c.__dict__) for c in (OpenAIServingChat, TokenizerManager, BaseMultimodalProcessor,
                                           GenerateReqInput)}
    monkeypatch.setattr(ic, "_REGISTERED", False)
    monkeypatch.setattr(HookRegistry, "_hooks", collections.defaultdict(list))
    monkeypatch.setattr(HookRegistry, "_patched", set(), raising=False)
    try:
        from sgl_slim.config import MediaConfig, SlimConfig  # noqa: PLC0415

        monkeypatch.setattr(ic, "_ALLOWED_DIR", None)
        ic.install(SlimConfig(media=MediaConfig(allowed_local_media_path="/")))
        HookRegistry.apply_hooks()
        assert isinstance(BaseMultimodalProcessor.__dict__["_load_single_item"], classmethod)
        with pytest.raises(ValueError, match="No such file"):
            BaseMultimodalProcessor._load_single_item("file:///nonexistent/sgl_slim.png", _image_modality())
        ic.install(SlimConfig())                                  # default: no local media at all
        with pytest.raises(ValueError, match="local media paths are refused"):
            BaseMultimodalProcessor._load_single_item("file:///nonexistent/sgl_slim.png", _image_modality())
        with pytest.raises(ValueError, match="does not accept image"):
            TokenizerManager._validate_mm_limits(_TMWith(MultimodalSpecialTokens(audio_token="<a>")), _Req(image=["a"]))
        with pytest.raises(ValueError, match="top_logprobs_num must be a single value"):
            GenerateReqInput(text="hi", top_logprobs_num=[5]).normalize_batch_and_arguments()
        with pytest.raises(ValueError, match="input_ids contains token id 100"):
            TokenizerManager._validate_one_request(_TMVocab(), GenerateReqInput(input_ids=[100]), [100])
        assert BaseMultimodalProcessor.__dict__["load_mm_data"] is not saved[BaseMultimodalProcessor]["load_mm_data"]
    finally:
        for cls, attrs in saved.items():
            for name in ("_load_single_item", "_validate_mm_limits", "_validate_request", "_validate_one_request",
                         "normalize_batch_and_arguments", "_handle_parallel_sampling", "load_mm_data"):
                if name in attrs:
                    setattr(cls, name, attrs[name])


def _image_modality():
    from sglang.srt.managers.schedule_batch import Modality

    return Modality.IMAGE


class _TMWith:
    def __init__(self, tokens):
        self.mm_processor = type("P", (), {"mm_tokens": tokens})()


# --- local media: refused unless inside --allowed-local-media-path --------------------------------------------

def _reads(seen):
    def original(cls, data, modality, *args):
        seen.append(data)
        return "loaded"
    return original


@pytest.mark.parametrize("data,modality", [("file:///etc/hostname", "IMAGE"), ("/etc/hostname", "IMAGE"),
                                           ("/9j/4AAQSkZJRg==", "IMAGE"), ("speech.wav", "AUDIO"),
                                           ("file:///tmp/a%20b.wav", "AUDIO"), ("/etc/hostname", "VIDEO")])
def test_local_paths_are_refused_by_default(data, modality):
    seen = []
    with pytest.raises(ValueError, match="--allowed-local-media-path DIR"):
        ic._load_single_item_around(_reads(seen), object, data, modality)
    assert seen == [], "the loader must not run for a refused path"


@pytest.mark.parametrize("data,modality", [("data:image/png;base64,iVBORw0KGgo=", "IMAGE"),
                                           ("https://example.com/cat.png", "IMAGE"), ("iVBORw0KGgo=", "IMAGE"),
                                           ("data:audio/wav;base64,UklGRg==", "AUDIO"), (b"\x89PNG", "IMAGE")])
def test_inline_and_remote_media_pass_untouched(data, modality):
    seen = []
    assert ic._load_single_item_around(_reads(seen), object, data, modality) == "loaded"
    assert seen == [data]


def test_allowed_dir_admits_its_files_and_nothing_that_escapes(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cat.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"s")
    (root / "link.png").symlink_to(tmp_path / "secret.png")              # a symlink pointing out
    (root / "dirlink").symlink_to(tmp_path)                                # a directory symlink pointing out
    (tmp_path / "media-evil").mkdir()                                      # shares the prefix "media"
    (tmp_path / "media-evil" / "x.png").write_bytes(b"e")
    allowed = str(root.resolve())
    inside = (root / "sub" / "cat.png").resolve()
    for data in (f"file://{root}/sub/cat.png", f"{root}/sub/../sub/cat.png", f"file://{root}/sub/./cat.png"):
        assert ic.check_local_media(data, "IMAGE", allowed) == f"file://{inside}"
    for data in (f"file://{root}/../secret.png", f"{root}/sub/../../secret.png", f"file://{root}/link.png",
                 f"{root}/dirlink/secret.png", f"file://{tmp_path}/media-evil/x.png", "file:///etc/passwd"):
        with pytest.raises(ValueError, match="outside --allowed-local-media-path"):
            ic.check_local_media(data, "IMAGE", allowed)


def test_allowed_dir_reaches_the_hook_through_the_config(tmp_path, monkeypatch):
    from sgl_slim.config import MediaConfig, SlimConfig  # noqa: PLC0415

    (tmp_path / "a.wav").write_bytes(b"RIFF")
    monkeypatch.setattr(ic, "_REGISTERED", True)                           # no SGLang registration here
    monkeypatch.setattr(ic, "_DECODER", {"chosen": True, "lock": None})
    ic.install(SlimConfig(media=MediaConfig(allowed_local_media_path=str(tmp_path))))
    try:
        seen = []
        ic._load_single_item_around(_reads(seen), object, str(tmp_path / "a.wav"), "AUDIO")
        assert seen == [f"file://{(tmp_path / 'a.wav').resolve()}"]
    finally:
        ic.install(SlimConfig())
    with pytest.raises(ValueError, match="refused"):
        ic._load_single_item_around(_reads([]), object, str(tmp_path / "a.wav"), "AUDIO")


def test_allowed_dir_must_be_a_readable_directory(tmp_path):
    from sgl_slim.config import ConfigError, MediaConfig  # noqa: PLC0415

    with pytest.raises(ConfigError, match="--allowed-local-media-path: not a readable directory"):
        MediaConfig(allowed_local_media_path=str(tmp_path / "missing")).validate()
    MediaConfig(allowed_local_media_path=str(tmp_path)).validate()


class DecoderError(Exception):
    """What a video decoder raises on frames it cannot read (decord's own type derives from Exception)."""


def _run_preprocess(raising):
    import asyncio

    async def original(video, video_config=None):
        raise raising

    return asyncio.run(ic._preprocess_video_around(original, object(), video_config={}))


def test_unreadable_video_frames_become_a_value_error_naming_the_video():
    expected = r"the video's frames could not be read \(DecoderError: DECORD: size must match\)$"
    with pytest.raises(ValueError, match=expected):
        _run_preprocess(DecoderError("[12:16:44] ndarray.cc:171: Check failed\nDECORD: size must match"))
    with pytest.raises(ValueError, match="video's frames could not be read .RuntimeError"):
        _run_preprocess(RuntimeError("Could not decode frame 3"))


@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("cuda"), ValueError("nframes"),
                                   KeyboardInterrupt()], ids=["memory", "oom", "already-400", "not-an-error"])
def test_server_faults_and_client_errors_pass_through_unchanged(error):
    with pytest.raises(type(error)) as got:
        _run_preprocess(error)
    assert got.value is error


def test_preprocessed_videos_pass_through():
    import asyncio

    async def original(video, video_config=None):
        return video, {"fps": 2}

    assert asyncio.run(ic._preprocess_video_around(original, "frames", video_config={})) == ("frames", {"fps": 2})


@pytest.mark.parametrize("frames,refused", [(1, True), (2, False), (5, False)])
def test_a_video_shorter_than_one_temporal_patch_is_refused_by_name(frames, refused):
    import asyncio

    pytest.importorskip("decord")
    import numpy as np
    import sglang.srt.utils.video_decoder as decoder

    from sgl_slim.bench.workload import mjpeg_avi

    clip = mjpeg_avi([np.full((32, 32, 3), 40 * i, np.uint8) for i in range(frames)], fps=2)
    reached = []

    async def original(video, video_config=None):
        reached.append(len(video))
        return "frames", {}

    old = decoder._BACKEND
    decoder._BACKEND = "decord"            # the decoder this machine serves videos with
    try:
        video = decoder.VideoDecoderWrapper(clip)
        if refused:
            with pytest.raises(ValueError, match=r"^the video has 1 frame; this model needs at least 2 \(one "
                                                 r"temporal patch\)$"):
                asyncio.run(ic._preprocess_video_around(original, video, video_config={}))
            assert reached == []
        else:
            assert asyncio.run(ic._preprocess_video_around(original, video, video_config={})) == ("frames", {})
            assert reached == [frames]
    finally:
        decoder._BACKEND = old


# --- /generate fields the scheduler would die on, per-prompt fields that do not match the prompts ---------------

def _gen(**fields):
    from sglang.srt.managers.io_struct import GenerateReqInput

    return GenerateReqInput(**{"text": "hi", "sampling_params": {"max_new_tokens": 2}, **fields})


class _TMVocab:
    model_config = type("C", (), {"vocab_size": 100})()


@pytest.mark.parametrize("fields, ids, words", [
    ({"input_ids": [1, 100]}, [1, 100], "token id 100, outside this model's vocabulary [0, 100)"),
    ({"input_ids": [-1, 5]}, [-1, 5], "token id -1"),
    ({}, [], "the prompt is empty"),
    ({"top_logprobs_num": 101}, [1], "top_logprobs_num must be between 0 and the vocabulary size 100, got 101"),
    ({"top_logprobs_num": -1}, [1], "top_logprobs_num"),
    ({"logprob_start_len": -2}, [1], "logprob_start_len must be -1"),
    ({"positional_embed_overrides": {"embeds": [1.0], "positions": [0]}}, [1], "it cannot be sent as JSON"),
])
def test_token_fields_the_scheduler_would_die_on_are_refused(fields, ids, words):
    obj = _gen(**fields)
    obj.normalize_batch_and_arguments()
    with pytest.raises(ValueError, match=re.escape(words)):
        ic._validate_one_request_before(_TMVocab(), obj, ids)


def test_token_fields_within_range_pass():
    obj = _gen(input_ids=[0, 99], top_logprobs_num=100, logprob_start_len=-1)
    obj.normalize_batch_and_arguments()
    assert ic._validate_one_request_before(_TMVocab(), obj, [0, 99]) is None
    # ids the tokenizer or the multimodal processor made are the model's own: only the client's are checked
    assert ic.token_fields_error(_gen(), [5000], 100) is None


@pytest.mark.parametrize("fields, words", [
    ({"sampling_params": []}, "non-empty list"),
    ({"text": None, "input_embeds": []}, "input_embeds is empty"),
    ({"text": None, "input_embeds": [[]]}, "input_embeds is empty"),
    ({"sampling_params": {"n": None}}, "n must be a whole number from 1 to 128"),
    ({"sampling_params": {"n": 0}}, "n must be"),
    ({"sampling_params": {"n": 129}}, "n must be a whole number from 1 to 128"),
    ({"sampling_params": {"stop_regex": ["ok", "(a"]}}, "stop_regex '(a' is not a valid regular expression"),
    ({"sampling_params": {"top_k": 10 ** 12}}, "top_k must be -1 (every token) or a whole number from 1"),
    ({"sampling_params": {"logit_bias": {"5": 1e308}}}, "logit_bias['5'] = 1e+308 is beyond fp32's range"),
    ({"sampling_params": {"logit_bias": {"5": 1.0, "7": -1e39}}}, "logit_bias['7'] = -1e+39 is beyond fp32's"),
    ({"sampling_params": [{}, {}]}, "sampling_params must be one object for a single prompt"),
    ({"top_logprobs_num": [5]}, "top_logprobs_num must be a single value for a single prompt"),
    ({"rid": ["a"]}, "rid must be a string for a single prompt"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params: a list needs one entry per prompt"),
    ({"text": ["a", "b"], "return_logprob": [True]}, "return_logprob: a list needs one entry per prompt"),
    ({"text": ["a", "b"], "audio_data": [None]}, "audio_data: a list needs one entry"),
    ({"text": ["a", "b"], "modalities": ["image"]}, "modalities: a list needs one entry"),
])
def test_per_prompt_fields_that_do_not_match_the_prompts_are_refused(fields, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        ic._normalize_around(lambda self: self.normalize_batch_and_arguments(), _gen(**fields))


@pytest.mark.parametrize("fields", [
    {}, {"sampling_params": {"n": 3, "temperature": 1}}, {"text": ["a", "b"], "sampling_params": [{}, {"n": 1}]},
    {"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 2}]},
    {"text": ["a", "b"], "return_logprob": [True, False]},
    {"text": ["a", "b"], "modalities": []}, {"input_ids": [[1], [2]], "top_logprobs_num": 3},
    {"audio_data": ["a.wav", "b.wav"], "sampling_params": {"n": 2}},     # one prompt's two clips, two samples
    {"sampling_params": {"stop_regex": "a+b"}}, {"sampling_params": {"top_k": 2 ** 31 - 1}},
    {"sampling_params": {"n": 128, "temperature": 1}},
    {"sampling_params": {"logit_bias": {"5": 100, "6": -3.4e38}}},
])
def test_well_formed_requests_normalize_as_before(fields):
    obj = _gen(**fields)
    ic._normalize_around(lambda self: self.normalize_batch_and_arguments(), obj)
    if obj.is_single:
        assert isinstance(obj.sampling_params, dict)
    else:                                  # every prompt's entry is there (SGLang indexes them so)
        assert [obj[i].rid for i in range(len(obj.rid))] == obj.rid


@pytest.mark.parametrize("modality", ic.MODALITIES)
def test_one_prompts_media_stay_together_when_n_makes_it_a_batch(modality):
    """n > 1 turns one prompt into a batch of one: its media list is that prompt's items, not one per prompt."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = _gen(sampling_params={"n": 2}, **{f"{modality}_data": ["a", "b"]})
    obj._determine_batch_size()
    ic._handle_parallel_sampling_around(GenerateReqInput._handle_parallel_sampling, obj)
    assert getattr(obj, f"{modality}_data") == [["a", "b"]]
    obj._normalize_batch_inputs()
    assert [getattr(obj[i], f"{modality}_data") for i in range(2)] == [["a", "b"], ["a", "b"]]
    batch = _gen(text=["x", "y"], sampling_params={"n": 2}, **{f"{modality}_data": ["a", "b"]})
    batch._determine_batch_size()
    ic._handle_parallel_sampling_around(GenerateReqInput._handle_parallel_sampling, batch)
    assert getattr(batch, f"{modality}_data") == ["a", "b"]            # a batch's list is one item per prompt


# --- media without a placeholder: SGLang's loader drops the items left over -----------------------------------

def _loader(n_images: int, n_audios: int = 0):
    from sglang.srt.multimodal.processors.base_processor import BaseMultiModalProcessorOutput

    async def original(self, prompt, multimodal_tokens, image_data=None, video_data=None, audio_data=None, **kw):
        return BaseMultiModalProcessorOutput(input_text=prompt, images=["img"] * n_images, audios=["a"] * n_audios)
    return original


class _Proc:
    @staticmethod
    def _is_preprocessed_input(item):
        return isinstance(item, dict)


_QWEN_TOKENS = MultimodalSpecialTokens(image_token="<|vision_start|><|image_pad|><|vision_end|>")


@pytest.mark.parametrize("sent,loaded,words", [
    (1, 0, "the request has 1 image input but its prompt has 0 image placeholders"),
    (3, 2, "the request has 3 image inputs but its prompt has 2 image placeholders"),
])
def test_media_the_loader_dropped_are_refused_naming_the_placeholder(sent, loaded, words):
    import asyncio

    with pytest.raises(ValueError, match=re.escape(words)) as err:
        asyncio.run(ic._load_mm_data_around(_loader(loaded), _Proc(), "prompt", _QWEN_TOKENS,
                                            image_data=["x"] * sent))
    assert "put <|vision_start|><|image_pad|><|vision_end|> in the prompt once per image" in str(err.value)


@pytest.mark.parametrize("kwargs,n_images,n_audios", [
    ({"image_data": ["x", "y"]}, 2, 0),                       # one placeholder each
    ({"image_data": ["x"]}, 3, 0),                            # an item that loads as several images
    ({"image_data": [{"format": "processor_output"}, "y"]}, 1, 0),   # a preprocessed item is not counted
    ({"audio_data": ["a"], "image_data": None}, 0, 1),
    ({}, 0, 0),
])
def test_media_with_their_placeholders_pass(kwargs, n_images, n_audios):
    import asyncio

    out = asyncio.run(ic._load_mm_data_around(_loader(n_images, n_audios), _Proc(), "p", _QWEN_TOKENS, **kwargs))
    assert len(out.images) == n_images and len(out.audios) == n_audios


# --- a streaming /generate refused before its stream: the 400 a non-streaming request gets ----------------------

def _stream(events):
    from starlette.background import BackgroundTask
    from starlette.responses import StreamingResponse

    async def body():
        for e in events:
            yield e
    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(lambda: None))


def _refuse(exc):
    from starlette.responses import JSONResponse
    return JSONResponse({"error": {"message": str(exc)}}, status_code=exc.status_code)


def test_a_streams_first_error_event_becomes_the_http_error():
    import asyncio
    import json

    events = [b'data: {"error":{"message":"input_ids contains token id 9","code":400}}\n\n', b"data: [DONE]\n\n"]
    out = asyncio.run(ic.first_event_or_error(_stream(events), _refuse))
    assert out.status_code == 400 and json.loads(out.body)["error"]["message"] == "input_ids contains token id 9"
    assert out.background is not None, "the request's abort task still runs"
    dropped = asyncio.run(ic.first_event_or_error(_stream(events), _refuse, keep_background=False))
    assert dropped.status_code == 400 and dropped.background is None
    for code, status in ((413, 413), ("bad", 400), (None, 400), (200, 400)):
        event = b'data: {"error":{"message":"m","code":' + json.dumps(code).encode() + b"}}\n\n"
        assert asyncio.run(ic.first_event_or_error(_stream([event]), _refuse)).status_code == status, code


@pytest.mark.parametrize("events", [
    [b'data: {"text":"a","meta_info":{}}\n\n', b'data: {"text":"ab","meta_info":{}}\n\n', b"data: [DONE]\n\n"],
    [b'data: {"text":"","meta_info":{"error":"x"}}\n\n', b"data: [DONE]\n\n"],     # "error" deeper: an output
    [],
])
def test_a_stream_that_starts_with_an_output_streams_on_unchanged(events):
    import asyncio

    async def run():
        response = await ic.first_event_or_error(_stream(events), _refuse)
        return response, [e async for e in response.body_iterator]
    response, seen = asyncio.run(run())
    assert response.status_code == 200 and seen == events
