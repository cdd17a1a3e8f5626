"""Bad input, end to end, on the CPU demo servers (image model with IDPruner, audio model with Samp): every bad
request is answered with a 4xx within the timeout (never a 5xx or a hang), and a normal request succeeds right
after each one."""

import base64
import io
import socket

import pytest
import requests

from serving import CONTEXT_LENGTH, png_data_url, wav_data_url

pytestmark = pytest.mark.e2e

TIMEOUT_S = 180  # a hang is a failure (requests raises ReadTimeout)


def _closed_port() -> int:
    with socket.socket() as s:  # bound then released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


PNG = base64.b64decode(png_data_url().split(",", 1)[1])
WAV_URL = wav_data_url(seconds=1.0, seed=1)
WAV = base64.b64decode(wav_data_url(seconds=1.0).split(",", 1)[1])
CLOSED = _closed_port()

BAD_IMAGES = {
    "corrupt": _b64(bytes(range(256)) * 8, "image/png"),
    "empty": "data:image/png;base64,",
    "truncated": _b64(PNG[: len(PNG) // 2], "image/png"),
    "header-only": _b64(PNG[:33], "image/png"),
    "not-base64": "data:image/png;base64,@@@not*base64@@@",
    "wav-as-image": _b64(WAV, "image/png"),
    "text-as-image": _b64(b"just some text, not an image\n" * 10, "text/plain"),
    "decompression-bomb": _b64(_png_bytes(20000, 10000, mode="1"), "image/png"),  # 2e8 px > PIL's bomb limit
    "unreachable-url": f"http://127.0.0.1:{CLOSED}/cat.png",
    "missing-local-file": "file:///nonexistent/sgl_slim/cat.png",
    "not-an-image-file": "file:///etc/hostname",
    "unknown-scheme": "ftp://127.0.0.1/cat.png",
}
BAD_AUDIO = {
    "corrupt": _b64(bytes(range(256)) * 8, "audio/wav"),
    "empty": "data:audio/wav;base64,",
    "truncated": _b64(WAV[:30], "audio/wav"),  # cut inside the RIFF/fmt header
    "riff-only": _b64(WAV[:12], "audio/wav"),
    "not-base64": "data:audio/wav;base64,@@@not*base64@@@",
    "png-as-audio": _b64(PNG, "audio/wav"),
    "text-as-audio": _b64(b"just some text, not audio\n" * 10, "text/plain"),
    "unreachable-url": f"http://127.0.0.1:{CLOSED}/clip.wav",
    "missing-local-file": "file:///nonexistent/sgl_slim/clip.wav",
    "not-an-audio-file": "file:///etc/hostname",
}


# Stock SGLang 0.5.23 (plain `sglang.launch_server`, same demo models and flags; measured 2026-11-28) answers
# six of these cases wrongly; sgl_slim.integration.input_checks turns each into a 400 on sgl_slim servers:
#   image:decompression-bomb    500 (PIL DecompressionBombError -> RuntimeError)
#   image/audio:missing-local-file  500 (FileNotFoundError -> RuntimeError)
#   audio sent to the image model   200 (the Qwen2.5-VL processor drops the audio silently)
#   image sent to the audio model   500 ('feature_attention_mask not found in processor output')
#   top_logprobs=-1                 200 (answered with empty top_logprobs; OpenAI allows 0..20)
# tests/integration/test_input_checks.py checks the hooks themselves; these cases check the served result.


def _chat(srv, body: dict | None = None, *, data: bytes | None = None, headers: dict | None = None):
    url = f"{srv.base_url}/v1/chat/completions"
    if data is not None:
        r = requests.post(url, data=data, headers=headers or {}, timeout=TIMEOUT_S)
    else:
        r = requests.post(url, json={"model": "default", "max_tokens": 4, "temperature": 0, **body},
                          timeout=TIMEOUT_S)
    return r.status_code, r.text[:500]


def _image_body(url: str, text: str = "Describe the image.") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}]}


def _audio_body(url: str, text: str = "What is said?") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}},
                                                      {"type": "text", "text": text}]}]}


def _text_body(text: str = "Say hello.") -> dict:
    return {"messages": [{"role": "user", "content": text}]}


def _assert_4xx_then_serves(srv, status, text, good_body):
    assert 400 <= status < 500, f"expected a 4xx, got {status}: {text}"
    ok_status, ok_text = _chat(srv, good_body)
    assert ok_status == 200, f"normal request after the bad one: {ok_status}: {ok_text}"


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_is_4xx_and_server_keeps_serving(vl_server, case):
    status, text = _chat(vl_server, _image_body(BAD_IMAGES[case]))
    _assert_4xx_then_serves(vl_server, status, text, _image_body(png_data_url(seed=1)))


@pytest.mark.parametrize("case", list(BAD_AUDIO))
def test_bad_audio_is_4xx_and_server_keeps_serving(audio_server, case):
    status, text = _chat(audio_server, _audio_body(BAD_AUDIO[case]))
    _assert_4xx_then_serves(audio_server, status, text, _audio_body(wav_data_url(seconds=1.0, seed=1)))


@pytest.mark.parametrize("size", [(1, 1), (1, 600), (4000, 3000)], ids=["1x1", "1x600", "4000x3000"])
def test_odd_image_sizes_are_resized_or_4xx(vl_server, size):
    """Images outside the processor's pixel range are resized (Qwen2.5-VL's min/max pixels) or refused with
    a 4xx (extreme aspect ratios); never a 5xx."""
    status, text = _chat(vl_server, _image_body(_b64(_png_bytes(*size), "image/png")))
    assert status == 200 or 400 <= status < 500, f"{size}: {status}: {text}"
    ok_status, ok_text = _chat(vl_server, _image_body(png_data_url(seed=1)))
    assert ok_status == 200, ok_text


def _zero_sample_wav() -> str:
    import numpy as np  # noqa: PLC0415
    import soundfile as sf  # noqa: PLC0415

    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    return _b64(buf.getvalue(), "audio/wav")


@pytest.mark.parametrize("case", ["40s", "zero-samples"])
def test_long_and_empty_clips_are_served_or_4xx(audio_server, case):
    """A clip longer than the encoder's 30 s window is cut by the processor; a well-formed WAV with no samples
    may be served (no audio tokens) or refused; never a 5xx."""
    url = wav_data_url(seconds=40.0) if case == "40s" else _zero_sample_wav()
    status, text = _chat(audio_server, _audio_body(url))
    assert status == 200 or 400 <= status < 500, f"{status}: {text}"
    ok_status, ok_text = _chat(audio_server, _audio_body(wav_data_url(seconds=1.0, seed=1)))
    assert ok_status == 200, ok_text


def test_audio_sent_to_the_image_model_is_4xx(vl_server):
    status, text = _chat(vl_server, _audio_body(wav_data_url(seconds=1.0)))
    assert "does not accept audio" in text and "image" in text, text
    _assert_4xx_then_serves(vl_server, status, text, _text_body())


def test_image_sent_to_the_audio_model_is_4xx(audio_server):
    status, text = _chat(audio_server, _image_body(png_data_url()))
    assert "does not accept image" in text and "audio" in text, text
    _assert_4xx_then_serves(audio_server, status, text, _text_body())


PARAMS = {
    "max_tokens=-1": {"max_tokens": -1},
    "temperature=-1": {"temperature": -1},
    "top_p=2": {"top_p": 2},
    "top_p=0": {"top_p": 0},
    "top_k=-5": {"top_k": -5, "temperature": 0.7},  # temperature 0 makes SGLang set top_k = 1 first
    "top_k=10**12": {"top_k": 10 ** 12, "temperature": 0.7},   # stock: int32 overflow, the server dies
    "n=0": {"n": 0},
    "n=100000": {"n": 100000},          # stock: 100,000 queued samples keep a worker busy for minutes
    "presence_penalty=5": {"presence_penalty": 5},
    "frequency_penalty=-3": {"frequency_penalty": -3},
    "top_logprobs=-1": {"logprobs": True, "top_logprobs": -1},
    "min_tokens>max_tokens": {"min_tokens": 10, "max_tokens": 2},
    "max_tokens=string": {"max_tokens": "many"},
    "logit_bias=1e308": {"logit_bias": {"5": 1e308}, "temperature": 0.7},
}


@pytest.mark.parametrize("case", list(PARAMS))
def test_out_of_range_parameters_are_4xx(vl_server, case):
    status, text = _chat(vl_server, {**_image_body(png_data_url()), **PARAMS[case]})
    _assert_4xx_then_serves(vl_server, status, text, _image_body(png_data_url(seed=1)))


def test_prompt_longer_than_the_context_is_4xx(vl_server, audio_server):
    long_text = "word " * (CONTEXT_LENGTH * 2)
    for srv in (vl_server, audio_server):
        status, text = _chat(srv, _text_body(long_text))
        _assert_4xx_then_serves(srv, status, text, _text_body())
    # media tokens push an otherwise short enough prompt over the context
    status, text = _chat(vl_server, _image_body(png_data_url(), text="word " * (CONTEXT_LENGTH - 40)))
    _assert_4xx_then_serves(vl_server, status, text, _image_body(png_data_url(seed=1)))


# Token-level and per-prompt fields of /generate and /v1/completions. Stock SGLang 0.5.23 (measured 2026-12-04)
# lets the first seven and JSON positional_embed_overrides reach the scheduler, which raises and takes the whole
# server down; the others are 500s.
# sgl_slim.integration.input_checks answers each with a 400 naming the field.
_PROMPT = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"   # the demo model's image placeholder
_SP = {"max_new_tokens": 2, "temperature": 0}
_LOGPROBS = {"text": _PROMPT, "sampling_params": _SP, "return_logprob": True}
_BATCH = {"text": [_PROMPT, _PROMPT], "sampling_params": _SP}
GENERATE = {  # case: (body, a word the 400 must contain)
    "input id outside the vocabulary": ({"input_ids": [1, 2, 10 ** 6], "sampling_params": _SP}, "vocabulary"),
    "negative input id": ({"input_ids": [1, -5], "sampling_params": _SP}, "vocabulary"),
    "empty text": ({"text": "", "sampling_params": _SP}, "empty"),
    "empty prompt in a batch": ({"input_ids": [[]], "sampling_params": _SP}, "empty"),
    "top_logprobs_num above the vocabulary": ({**_LOGPROBS, "top_logprobs_num": 10 ** 6}, "top_logprobs_num"),
    "logprob_start_len=-5": ({**_LOGPROBS, "logprob_start_len": -5}, "logprob_start_len"),
    "top_logprobs_num list for one prompt": ({**_LOGPROBS, "top_logprobs_num": [5]}, "top_logprobs_num"),
    "rid list for one prompt": ({"text": _PROMPT, "sampling_params": _SP, "rid": ["a"]}, "rid"),
    "sampling_params list shorter than the batch": ({**_BATCH, "sampling_params": [_SP]}, "sampling_params"),
    "return_logprob list shorter than the batch": ({**_BATCH, "return_logprob": [True]}, "return_logprob"),
    "sampling_params list for one prompt": ({"text": _PROMPT, "sampling_params": [_SP, _SP]}, "sampling_params"),
    "empty sampling_params list": ({**_BATCH, "sampling_params": []}, "sampling_params"),
    "n=null": ({"text": _PROMPT, "sampling_params": {**_SP, "n": None}}, "n must be"),
    "stop_regex that does not compile": ({"text": _PROMPT, "sampling_params": {**_SP, "stop_regex": "(a"}},
                                         "stop_regex"),
    "positional_embed_overrides as JSON": ({"text": _PROMPT, "sampling_params": _SP,
                                            "positional_embed_overrides": [1, 2]}, "positional_embed_overrides"),
    "empty input_embeds": ({"input_embeds": [[]], "sampling_params": _SP}, "input_embeds"),
    # stock: 200, the image dropped without a word (the answer never saw it)
    "image without a placeholder": ({"text": _PROMPT, "image_data": png_data_url(), "sampling_params": _SP},
                                    "placeholder"),
    "more images than placeholders": ({"text": _PROMPT.replace("Say", _IMAGE + "Say"), "sampling_params": _SP,
                                       "image_data": [png_data_url(), png_data_url(seed=1)]}, "placeholder"),
    # stock: 200; with temperature the fp32 bias is inf, the probabilities NaN and the answer token 0
    "logit_bias beyond fp32": ({"text": _PROMPT, "sampling_params": {**_SP, "temperature": 0.7,
                                                                     "logit_bias": {"5": 1e308}}}, "logit_bias"),
}


@pytest.mark.parametrize("case", list(GENERATE))
def test_bad_generate_fields_are_400_and_server_keeps_serving(vl_server, case):
    body, word = GENERATE[case]
    r = requests.post(f"{vl_server.base_url}/generate", json=body, timeout=TIMEOUT_S)
    assert r.status_code == 400 and word in r.text, f"{r.status_code}: {r.text[:500]}"
    _assert_4xx_then_serves(vl_server, r.status_code, r.text[:500], _text_body())


@pytest.mark.parametrize("case", ["input id outside the vocabulary", "image without a placeholder",
                                  "n=null", "logit_bias beyond fp32"])
def test_a_bad_streaming_generate_is_the_same_400(vl_server, case):
    """Stock: 200 and the error as the stream's first event (SGLang's frontend client then fails on it with
    KeyError: 'text'); now the 400 a non-streaming request gets, and a good stream is unchanged."""
    body, word = GENERATE[case]
    r = requests.post(f"{vl_server.base_url}/generate", json={**body, "stream": True}, timeout=TIMEOUT_S)
    assert r.status_code == 400 and word in r.json()["error"]["message"], f"{r.status_code}: {r.text[:500]}"
    good = requests.post(f"{vl_server.base_url}/generate", stream=True, timeout=TIMEOUT_S,
                         json={"text": _PROMPT, "sampling_params": _SP, "stream": True})
    events = [line for line in good.iter_lines() if line]
    assert good.status_code == 200 and events[-1] == b"data: [DONE]" and len(events) >= 2, events
    assert all(b'"text"' in e for e in events[:-1]), events


def test_audio_without_a_placeholder_is_400(audio_server):
    """Stock: 200, the clip dropped without a word."""
    r = requests.post(f"{audio_server.base_url}/generate", timeout=TIMEOUT_S,
                      json={"text": _PROMPT, "audio_data": WAV_URL, "sampling_params": _SP})
    assert r.status_code == 400 and "1 audio input but its prompt has 0 audio placeholders" in r.text, r.text[:500]
    _assert_4xx_then_serves(audio_server, r.status_code, r.text[:500], _text_body())


def test_completions_logprobs_above_the_vocabulary_is_400(vl_server):
    """/v1/completions' ``logprobs`` becomes top_logprobs_num: stock SGLang's server dies on 10**6."""
    r = requests.post(f"{vl_server.base_url}/v1/completions", timeout=TIMEOUT_S,
                      json={"model": "default", "prompt": "Say hello.", "max_tokens": 2, "logprobs": 10 ** 6})
    assert r.status_code == 400 and "top_logprobs_num" in r.text, r.text[:500]
    _assert_4xx_then_serves(vl_server, r.status_code, r.text[:500], _text_body())


def test_one_prompt_with_several_media_and_n_samples_is_served(vl_server, audio_server):
    """Stock SGLang 0.5.23 answers n > 1 on a prompt with two images or clips with a 400 that contradicts the
    request (its media read as one per sample); each sample must see all of them, as with n = 1."""
    for srv, body in [(vl_server, _image_body(png_data_url(seed=1))), (audio_server, _audio_body(WAV_URL))]:
        part = body["messages"][0]["content"][0]
        body["messages"][0]["content"].insert(0, part)           # the same item twice
        one = requests.post(f"{srv.base_url}/v1/chat/completions", timeout=TIMEOUT_S,
                            json={"model": "default", "max_tokens": 2, "temperature": 0, **body})
        two = requests.post(f"{srv.base_url}/v1/chat/completions", timeout=TIMEOUT_S,
                            json={"model": "default", "max_tokens": 2, "temperature": 0, "n": 2, **body})
        assert one.status_code == 200 and two.status_code == 200, f"{one.text[:300]} / {two.text[:300]}"
        assert two.json()["usage"]["prompt_tokens"] == one.json()["usage"]["prompt_tokens"]
        texts = [c["message"]["content"] for c in two.json()["choices"]]
        assert texts == [one.json()["choices"][0]["message"]["content"]] * 2


MALFORMED = {
    "not-json": (b"{this is not json", {"Content-Type": "application/json"}),
    "text/plain body": (b'{"model": "default", "messages": []}', {"Content-Type": "text/plain"}),
    "no messages": (b'{"model": "default"}', {"Content-Type": "application/json"}),
    "empty messages": (b'{"model": "default", "messages": []}', {"Content-Type": "application/json"}),
    "unknown part type": (b'{"model": "default", "messages": [{"role": "user", "content": '
                          b'[{"type": "hologram", "hologram": {"url": "x"}}]}]}', {"Content-Type": "application/json"}),
    "bad role": (b'{"model": "default", "messages": [{"role": "wizard", "content": "hi"}]}',
                 {"Content-Type": "application/json"}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_4xx(vl_server, case):
    data, headers = MALFORMED[case]
    status, text = _chat(vl_server, data=data, headers=headers)
    _assert_4xx_then_serves(vl_server, status, text, _text_body())
