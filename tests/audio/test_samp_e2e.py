"""Samp end to end on the CPU demo-audio server (float32, so rounding cannot flip a greedy token).

Two servers, from the session's server pool (tests/serving.py), started together:
  - samp:     --samp --samp-keep-ratio 0.5 --samp-merge-threshold 0.5 (the demo's random encoder gives
              dissimilar neighbours: 0.5 makes clusters form, so merging is exercised)
  - identity: --samp --samp-keep-ratio 1.0 --samp-merge-threshold 2.0
Oracle (tests/audio/samp_reference.py): a transformers forward of the same checkpoint, encoder without its
padding mask (as SGLang runs it), clips compressed by the plain-loop Samp reference, ordinary consecutive
positions (the integration renumbers positions), greedy decode.
"""

from __future__ import annotations

import base64
import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from samp_reference import compressed_inputs, greedy, load, load_audio_like_sglang
from serving import shared_server
from sgl_slim.config import SampConfig

pytestmark = pytest.mark.e2e

SAMP = SampConfig(enabled=True, keep_ratio=0.5, merge_threshold=0.5)
MAX_NEW = 8
COMMON = ["--model", "demo-audio", "--dtype", "float32", "--max-total-tokens", "16384"]
ONE = "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is said?"
TWO = "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\nCompare."
TEXT_ONLY = "What is said?"


def wav_bytes(seconds: float, rate: int = 16000, seed: int = 0) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * math.pi * (300 + 80 * seed) * t * (1 + 0.3 * t)) * (0.6 + 0.4 * np.sin(2 * math.pi * 2 * t))
    wave += 0.03 * np.random.default_rng(seed).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "audio/wav") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


samp_server = shared_server([*COMMON, "--samp", "--samp-keep-ratio", str(SAMP.keep_ratio),
                             "--samp-merge-threshold", str(SAMP.merge_threshold)])
identity_server = shared_server([*COMMON, "--samp", "--samp-keep-ratio", "1.0", "--samp-merge-threshold", "2.0"])


@pytest.fixture(scope="module")
def servers(samp_server, identity_server):
    return {"samp": samp_server, "identity": identity_server}


@pytest.fixture(scope="module")
def oracle():
    from sgl_slim.demo import ensure_demo
    return load(ensure_demo("demo-audio"))


def generate(server, text, audios, *, max_new=MAX_NEW):
    body = {"text": text, "sampling_params": {"max_new_tokens": max_new, "temperature": 0}, "return_logprob": True}
    if audios is not None:
        body["audio_data"] = audios
    return requests.post(f"{server.base_url}/generate", json=body, timeout=300)


def expect(oracle, text, clips: list[bytes], samp):
    proc, model = oracle
    ids, embeds, info = compressed_inputs(proc, model, text, [load_audio_like_sglang(c) for c in clips], samp)
    out_ids, logprobs = greedy(model, embeds, MAX_NEW)
    return len(ids), out_ids, logprobs, info


def check_equal(resp, want):
    assert resp.status_code == 200, resp.text
    body = resp.json()
    n_prompt, out_ids, logprobs, _ = want
    assert body["meta_info"]["prompt_tokens"] == n_prompt
    assert body["output_ids"] == out_ids
    got = [lp[0] for lp in body["meta_info"]["output_token_logprobs"]]
    # float32 on both sides, different kernels (SDPA vs torch_native paged attention): rounding-level gaps
    np.testing.assert_allclose(got, logprobs, rtol=0, atol=1e-4)


def alive(server):
    assert requests.get(f"{server.base_url}/health_generate", timeout=120).status_code == 200


# ------------------------------------------------------------------------------------------------------------

def test_prompt_tokens_shrink_to_keep_count(servers):
    clip = data_url(wav_bytes(3.0))                             # 300 mel frames -> N = 75 audio tokens
    text_only = generate(servers["samp"], TEXT_ONLY, None).json()["meta_info"]["prompt_tokens"]
    full = generate(servers["identity"], ONE, [clip]).json()["meta_info"]
    kept = generate(servers["samp"], ONE, [clip]).json()["meta_info"]
    assert full["prompt_tokens"] - kept["prompt_tokens"] == 75 - SAMP.keep_count(75)
    assert kept["audio_tokens"] == SAMP.keep_count(75) == 38 and full["audio_tokens"] == 75
    assert kept["prompt_tokens"] > text_only


@pytest.mark.parametrize("case", ["one", "two", "same-twice"])
def test_greedy_equals_transformers_on_compressed_embeddings(servers, oracle, case):
    clips = {"one": [wav_bytes(3.0)], "two": [wav_bytes(4.0, seed=1), wav_bytes(1.3, seed=2)],
             "same-twice": [wav_bytes(2.0, seed=3)] * 2}[case]
    text = ONE if len(clips) == 1 else TWO
    want = expect(oracle, text, clips, SAMP)
    assert any(len(g) > 1 for _, _, groups in want[3] for g in groups), "the oracle must exercise merging"
    check_equal(generate(servers["samp"], text, [data_url(c) for c in clips]), want)


def test_concurrent_batch_and_cache_hits(servers, oracle):
    clips = [wav_bytes(1.0 + 0.7 * i, seed=10 + i) for i in range(4)]
    wants = [expect(oracle, ONE, [c], SAMP) for c in clips]
    urls = [data_url(c) for c in clips]
    for _round in range(2):                                   # the second round hits the radix/embedding caches
        with ThreadPoolExecutor(8) as pool:
            resps = list(pool.map(lambda u: generate(servers["samp"], ONE, [u]), urls + urls))
        for resp, want in zip(resps, wants + wants):
            check_equal(resp, want)
    assert max(r.json()["meta_info"]["cached_tokens"] for r in resps) > 20


def test_keep_one_without_merging_equals_no_compression(servers, oracle):
    clips = [wav_bytes(2.5, seed=4), wav_bytes(1.1, seed=5)]
    want = expect(oracle, TWO, clips, None)
    check_equal(generate(servers["identity"], TWO, [data_url(c) for c in clips]), want)


@pytest.mark.parametrize("seconds,n_tokens", [(0.05, 1), (0.02, 0), (30.0, 750), (45.0, 750)])
def test_short_and_long_clips(servers, oracle, seconds, n_tokens):
    clip = wav_bytes(seconds, seed=6)
    want = expect(oracle, ONE, [clip], SAMP)
    assert [n for n, _, _ in want[3]] == ([n_tokens] if n_tokens else [])
    check_equal(generate(servers["samp"], ONE, [data_url(clip)]), want)
    alive(servers["samp"])


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_other_sample_rates_are_resampled(servers, oracle, rate):
    clip = wav_bytes(2.0, rate=rate, seed=7)
    want = expect(oracle, ONE, [clip], SAMP)
    assert want[3][0][0] == 50                                   # 2 s at 16 kHz after resampling
    check_equal(generate(servers["samp"], ONE, [data_url(clip)]), want)


@pytest.mark.parametrize("bad", ["corrupt", "empty", "text-file", "png-file", "truncated-wav"])
def test_bad_audio_is_a_clear_4xx_and_the_server_keeps_serving(servers, bad):
    payload = {
        "corrupt": data_url(bytes(range(256)) * 8),
        "empty": data_url(b""),
        "text-file": data_url(b"this is not audio at all\n" * 40, "text/plain"),
        "png-file": data_url(base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
                                              "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="), "image/png"),
        "truncated-wav": data_url(wav_bytes(1.0)[:30]),
    }[bad]
    resp = generate(servers["samp"], ONE, [payload])
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    assert resp.json().get("error") or resp.json().get("message") or resp.text
    alive(servers["samp"])
    ok = generate(servers["samp"], ONE, [data_url(wav_bytes(1.0))])
    assert ok.status_code == 200 and ok.json()["meta_info"]["audio_tokens"] == SAMP.keep_count(25)
