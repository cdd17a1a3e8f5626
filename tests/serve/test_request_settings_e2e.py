"""Per-request settings on the shared CPU image server (IDPruner on, --idpruner-keep-ratio 0.25) and audio server
(Samp on): a request's ``sgl_slim`` object changes that request alone, in a concurrent batch mixing settings and
with the radix cache on; a bad object is a 400 and the server lives on."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serving import VL_ARGS, audio_message, image_message, png_data_url, wav_data_url
from sgl_slim.config import IDPrunerConfig, SampConfig

pytestmark = pytest.mark.e2e

SERVER_KEEP = float(VL_ARGS[VL_ARGS.index("--idpruner-keep-ratio") + 1])
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Per-request settings: what is shown?"
          "<|im_end|>\n<|im_start|>assistant\n")
IMAGE = png_data_url(224, 168, seed=7)


def generate(srv, settings=None, **extra):
    body = {"text": PROMPT, "image_data": IMAGE, "sampling_params": {"temperature": 0, "max_new_tokens": 6},
            **extra}
    if settings is not None:
        body["sgl_slim"] = settings
    return requests.post(f"{srv.base_url}/generate", json=body, timeout=600)


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def kept(out) -> tuple[int, int]:
    numbers = out["meta_info"]["sgl_slim"]
    return numbers["vision_tokens_kept"], numbers["vision_tokens_total"]


def test_keep_ratios_in_one_batch_equal_each_alone(vl_server):
    alone = {0.5: ok(generate(vl_server, {"idpruner_keep_ratio": 0.5}))}
    # an image pruned at 0.5 is never reused for 1.0: only the text before the image can come from the cache
    alone[1.0] = ok(generate(vl_server, {"idpruner_keep_ratio": 1.0}))
    assert alone[1.0]["meta_info"]["cached_tokens"] < 8, alone[1.0]["meta_info"]
    settings = [{"idpruner_keep_ratio": 0.5}, {"idpruner_keep_ratio": 1.0}, None,
                {"idpruner_keep_ratio": SERVER_KEEP}] * 2
    with ThreadPoolExecutor(len(settings)) as pool:
        batch = [ok(r) for r in pool.map(lambda s: generate(vl_server, s), settings)]
    total = kept(alone[0.5])[1]
    for s, out in zip(settings, batch):
        ratio = SERVER_KEEP if s is None else s["idpruner_keep_ratio"]
        assert kept(out) == (IDPrunerConfig(keep_ratio=ratio).keep_count(total), total), (s, out["meta_info"])
        if ratio in alone:
            assert kept(out) == kept(alone[ratio]) and out["output_ids"] == alone[ratio]["output_ids"], s
        # the settings are echoed as applied, and only when sent
        assert {k: v for k, v in out["meta_info"]["sgl_slim"].items() if not k.startswith("vision_")} == (s or {})
    assert kept(alone[1.0]) == (total, total) and kept(alone[0.5])[0] < total
    # the server's own keep ratio sent explicitly: the same output as no object at all
    plain, same = batch[2], batch[3]
    assert same["output_ids"] == plain["output_ids"] and same["text"] == plain["text"]
    assert same["meta_info"]["prompt_tokens"] == plain["meta_info"]["prompt_tokens"]


def test_openai_extra_body_and_echo(vl_server):
    client = vl_server.openai()
    messages = image_message("Per-request settings: describe.", IMAGE)
    resp = client.chat.completions.create(model="default", messages=messages, max_tokens=4, temperature=0,
                                          extra_body={"sgl_slim": {"idpruner_keep_ratio": 1.0}})
    numbers = resp.to_dict()["metadata"]["sgl_slim"]
    assert numbers["idpruner_keep_ratio"] == 1.0
    assert numbers["vision_tokens_kept"] == numbers["vision_tokens_total"]


def test_openai_video_ratios_per_request_and_never_shared_in_the_cache(vl_server):
    # an 8-frame video: 4 frame groups; each keeps its share of its own tokens, by the request's ratio
    import random

    from sgl_slim.bench.workload import video_data_url

    video = {"type": "video_url", "video_url": {"url": video_data_url(8, random.Random(9))}}
    messages = [{"role": "user", "content": [video, {"type": "text", "text": "Per-request settings: what happens?"}]}]
    client = vl_server.openai()

    def ask(settings=None):
        extra = {"extra_body": {"sgl_slim": settings}} if settings else {}
        resp = client.chat.completions.create(model="default", messages=messages, max_tokens=2, temperature=0,
                                              **extra).to_dict()
        return resp["usage"], resp["metadata"]["sgl_slim"]

    full, full_numbers = ask({"idpruner_video_keep_ratio": 1.0})
    total = full_numbers["vision_tokens_total"]
    assert full["prompt_tokens_details"]["video_tokens"] == total == full_numbers["vision_tokens_kept"]
    group = total // 4
    for settings, ratio in [(None, SERVER_KEEP), ({"idpruner_video_keep_ratio": 0.5}, 0.5),
                            ({"idpruner_keep_ratio": 0.75}, 0.75)]:      # the image ratio, where no video ratio
        usage, numbers = ask(settings)
        want = 4 * IDPrunerConfig(keep_ratio=ratio).keep_count(group)
        assert numbers["vision_tokens_kept"] == usage["prompt_tokens_details"]["video_tokens"] == want, settings
        assert full["prompt_tokens"] - usage["prompt_tokens"] == total - want
        # the video pruned at another ratio is never reused: only the text before it can come from the cache
        assert usage["prompt_tokens_details"]["cached_tokens"] < 8, (settings, usage)


@pytest.mark.parametrize("settings,words", [
    ({"idpruner_keep_ratio": 1.5}, ["sgl_slim.idpruner_keep_ratio", "--idpruner-keep-ratio"]),
    ({"idpruner_keep_ratio": "half"}, ["sgl_slim.idpruner_keep_ratio", "must be a number"]),
    ({"samp_keep_ratio": 0.5}, ["sgl_slim.samp_keep_ratio", "started without --samp"]),
    ({"s2o": False}, ["sgl_slim.s2o", "started without --s2o"]),
    ({"keep": 0.5}, ["unknown field 'keep'"]),
    ("0.5", ["sgl_slim must be a JSON object"]),
])
def test_bad_objects_are_400_naming_the_field(vl_server, settings, words):
    chat = {"model": "default", "messages": image_message("hi", None), "max_tokens": 2, "sgl_slim": settings}
    answers = [generate(vl_server, settings), generate(vl_server, settings, stream=True),
               requests.post(f"{vl_server.base_url}/v1/chat/completions", json=chat, timeout=120),
               requests.post(f"{vl_server.base_url}/v1/chat/completions", json={**chat, "stream": True}, timeout=120)]
    for r in answers:
        assert r.status_code == 400, r.text
        assert all(w in r.text for w in words), r.text
    assert requests.get(f"{vl_server.base_url}/health", timeout=60).status_code == 200


def test_samp_keep_ratios_in_one_batch_equal_each_alone(audio_server):
    clip = wav_data_url(2.0, seed=3)

    def chat(settings):
        body = {"model": "default", "messages": audio_message("Per-request settings: what is heard?", clip),
                "max_tokens": 4, "temperature": 0, **({"sgl_slim": settings} if settings else {})}
        return ok(requests.post(f"{audio_server.base_url}/v1/chat/completions", json=body, timeout=600))

    def audio(out) -> tuple[int, int]:
        numbers = out["metadata"]["sgl_slim"]
        return numbers["audio_tokens_kept"], numbers["audio_tokens_total"]

    alone = {r: chat({"samp_keep_ratio": r}) for r in (0.3, 1.0)}
    settings = [{"samp_keep_ratio": 0.3}, {"samp_keep_ratio": 1.0}, None] * 2
    with ThreadPoolExecutor(len(settings)) as pool:
        batch = list(pool.map(chat, settings))
    total = audio(alone[1.0])[1]
    assert audio(alone[1.0]) == (total, total)
    for s, out in zip(settings, batch):
        ratio = SampConfig().keep_ratio if s is None else s["samp_keep_ratio"]
        assert audio(out) == (SampConfig(keep_ratio=ratio).keep_count(total), total), (s, out["metadata"])
        if s is not None:
            assert out["choices"][0]["message"]["content"] == alone[ratio]["choices"][0]["message"]["content"], s
            assert out["metadata"]["sgl_slim"]["samp_keep_ratio"] == ratio
