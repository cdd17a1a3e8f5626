"""Per-request sgl_slim numbers on real CPU servers: ``meta_info["sgl_slim"]`` (and the OpenAI responses'
``metadata``) equal what the server did, and ``/metrics`` (``--enable-metrics``) counts them once per request.

One server of this file's own (from the session's pool): the EAGLE-3 demo target with its trained draft, IDPruner,
S2O with a small --s2o-min-length, --enable-metrics. Audio runs on the shared demo-audio server (Samp on) of
conftest.py. To develop against a running server: SGL_SLIM_TEST_ATTACH=metrics_server=PORT:LOG_PATH (the S2O
checks read its log).
"""

import json
import re

import pytest
import requests

from serving import audio_message, image_message, png_data_url, shared_server, wav_data_url
from sgl_slim.config import IDPrunerConfig, SampConfig

pytestmark = pytest.mark.e2e

KEEP = 0.25
S2O_MIN = 64
S2O_LINE = re.compile(r"S2O prefill rid=(\S+) kv_len=(\d+) new=(\d+) density=([0-9.]+) (.*)")
PROM_LINE = re.compile(r'^(sgl_slim_\w+)\{([^}]*)\} (\S+)$')


METRICS_ARGS = ["--model-path", "{eagle_target}", "--dtype", "float32", "--max-total-tokens", "16384",
                "--context-length", "1024", "--eagle-draft", "{eagle_draft}", "--eagle-steps", "3",
                "--eagle-draft-tokens", "4", "--idpruner", "--idpruner-keep-ratio", str(KEEP),
                "--s2o", "--s2o-tau", "0.5", "--s2o-min-length", str(S2O_MIN), "--s2o-block-size", "16",
                "--s2o-segment-size", "32", "--s2o-variant", "v1", "--enable-metrics"]
metrics_server = shared_server(METRICS_ARGS)


@pytest.fixture(scope="module")
def spec_server(metrics_server):
    from sgl_slim.spec.target_lm import ensure_eagle_target

    metrics_server.target = ensure_eagle_target()
    return metrics_server


def image_tokens(target, width, height) -> int:
    """Vision tokens Qwen2.5-VL makes of a width x height image (multiples of patch * merge: no resizing)."""
    vision = json.loads((target / "config.json").read_text())["vision_config"]
    side = vision["patch_size"] * vision["spatial_merge_size"]
    assert width % side == 0 and height % side == 0
    return (width // side) * (height // side)


def generate(srv, text, max_new=8, **extra):
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new}, **extra}
    r = requests.post(f"{srv.base_url}/generate", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def chat(srv, messages, max_tokens=4):
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = requests.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def scrape(srv) -> dict:
    """{(name, frozenset(labels without model_name)): value} of sgl_slim's series on /metrics."""
    text = requests.get(f"{srv.base_url}/metrics", timeout=60).text
    out = {}
    for line in text.splitlines():
        m = PROM_LINE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            labels.pop("model_name", None)
            out[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return out


def delta(after, before, name, **labels):
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def two_image_message(text, sizes):
    parts = [{"type": "image_url", "image_url": {"url": png_data_url(w, h, seed=i)}} for i, (w, h) in enumerate(sizes)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def test_vision_numbers_are_what_idpruner_kept(spec_server):
    sizes = [(224, 224), (112, 168)]
    totals = [image_tokens(spec_server.target, w, h) for w, h in sizes]
    keeps = [IDPrunerConfig(enabled=True, keep_ratio=KEEP).keep_count(n) for n in totals]
    with_images = chat(spec_server, two_image_message("Describe both images.", sizes))
    text_only = chat(spec_server, two_image_message("Describe both images.", []))
    numbers = with_images["metadata"]["sgl_slim"]
    assert numbers["vision_tokens_total"] == sum(totals) and numbers["vision_tokens_kept"] == sum(keeps), numbers
    # the prompt holds exactly the kept tokens (plus <|vision_start|> / <|vision_end|> per image)
    grown = with_images["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"]
    assert grown == sum(keeps) + 2 * len(sizes)
    assert with_images["usage"]["prompt_tokens_details"]["image_tokens"] == sum(keeps)
    assert "vision_tokens_total" not in text_only["metadata"]["sgl_slim"]     # no image: no vision fields


def test_s2o_density_is_the_logged_density(spec_server):
    long_text = " ".join(f"word{i}" for i in range(120))                    # >= S2O_MIN tokens: sparse
    long_r, short_r = generate(spec_server, long_text), generate(spec_server, "hi there")
    lines = {}
    for rid, kv_len, new, density, how in S2O_LINE.findall(spec_server.log()):
        lines.setdefault(rid, []).append((int(kv_len), int(new), float(density), how))
    long_lines = lines[long_r["meta_info"]["id"]]
    assert len(long_lines) == 1 and long_lines[0][0] >= S2O_MIN and "tau=0.5" in long_lines[0][3], long_lines
    numbers = long_r["meta_info"]["sgl_slim"]
    assert numbers["s2o_sparse"] is True
    assert numbers["s2o_density"] == pytest.approx(long_lines[0][2], abs=5e-5) and numbers["s2o_density"] < 1.0
    (short_line,) = lines[short_r["meta_info"]["id"]]
    assert "dense" in short_line[3]
    assert short_r["meta_info"]["sgl_slim"]["s2o_density"] == 1.0
    assert short_r["meta_info"]["sgl_slim"]["s2o_sparse"] is False


def test_draft_numbers_agree_with_sglang_spec_counts(spec_server):
    for prompt in ("def fibonacci(n):\n    ", "class Stack:\n    def __init__(self):\n        self."):
        meta = generate(spec_server, prompt, max_new=32)["meta_info"]
        numbers = meta["sgl_slim"]
        assert meta["spec_verify_ct"] > 0
        assert numbers["draft_tokens_proposed"] == meta["spec_num_proposed_drafts"] == 3 * meta["spec_verify_ct"]
        assert numbers["draft_tokens_accepted"] == meta["spec_num_correct_drafts"]
        assert 0 <= numbers["draft_tokens_accepted"] <= numbers["draft_tokens_proposed"]
        # one prefill token + one bonus per verify + accepted drafts (the last verify may overshoot max_new)
        assert meta["completion_tokens"] <= 1 + meta["spec_verify_ct"] + numbers["draft_tokens_accepted"]


def test_streaming_generate_reports_once_at_the_end(spec_server):
    body = {"text": "import os\nimport sys\n", "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    with requests.post(f"{spec_server.base_url}/generate", json=body, stream=True, timeout=600) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != b"data: [DONE]"]
    found = [c["meta_info"].get("sgl_slim") for c in chunks]
    assert all(f is None for f in found[:-1]) and isinstance(found[-1], dict), found
    assert found[-1]["draft_tokens_proposed"] == chunks[-1]["meta_info"]["spec_num_proposed_drafts"]


def test_prometheus_counts_each_finished_request_once(spec_server):
    before = scrape(spec_server)
    n, size = 3, (224, 224)
    total = image_tokens(spec_server.target, *size)
    kept = IDPrunerConfig(enabled=True, keep_ratio=KEEP).keep_count(total)
    proposed = accepted = 0
    for i in range(n):
        r = chat(spec_server, image_message(f"Picture {i}: what is in it?", png_data_url(*size, seed=10 + i)))
        proposed += r["metadata"]["sgl_slim"]["draft_tokens_proposed"]
        accepted += r["metadata"]["sgl_slim"]["draft_tokens_accepted"]
    after = scrape(spec_server)
    assert delta(after, before, "sgl_slim_requests_total", feature="vision") == n
    assert delta(after, before, "sgl_slim_requests_total", feature="draft") == n
    assert delta(after, before, "sgl_slim_requests_total", feature="s2o") == n
    assert delta(after, before, "sgl_slim_vision_tokens_total", kind="original") == n * total
    assert delta(after, before, "sgl_slim_vision_tokens_total", kind="kept") == n * kept
    assert delta(after, before, "sgl_slim_draft_tokens_total", kind="proposed") == proposed
    assert delta(after, before, "sgl_slim_draft_tokens_total", kind="accepted") == accepted
    s2o_count = sum(delta(after, before, "sgl_slim_s2o_density_count", mode=m) for m in ("sparse", "dense"))
    assert s2o_count == n
    assert ("sgl_slim_audio_tokens_total", frozenset({("kind", "kept")})) not in after   # no audio on this server
    text = requests.get(f"{spec_server.base_url}/metrics", timeout=60).text           # SGLang's model_name label
    (sglang_name,) = set(re.findall(r'^sglang:context_len\{.*?model_name="([^"]*)"', text, re.M))
    ours = set(re.findall(r'^sgl_slim_\w+\{.*?model_name="([^"]*)"', text, re.M))
    assert ours == {sglang_name}, (ours, sglang_name)


def test_completions_endpoint_metadata(spec_server):
    body = {"model": "default", "prompt": " ".join(f"tok{i}" for i in range(100)), "max_tokens": 4,
            "temperature": 0}
    r = requests.post(f"{spec_server.base_url}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    numbers = r.json()["metadata"]["sgl_slim"]
    assert numbers["s2o_sparse"] is True and 0 < numbers["s2o_density"] < 1
    assert numbers["draft_tokens_proposed"] >= 0


def test_audio_numbers_are_what_samp_kept(audio_server):
    assert "--samp" in audio_server.args and "--samp-keep-ratio" not in audio_server.args   # Samp's default ratio
    samp = SampConfig(enabled=True)
    got = {}
    for seconds in (1.0, 2.0):
        r = chat(audio_server, audio_message("What is said?", wav_data_url(seconds)), max_tokens=2)
        numbers = r["metadata"]["sgl_slim"]
        mel = int(seconds * 100)                                              # Whisper features: 100 frames / s
        total = ((mel - 1) // 2 + 1 - 2) // 2 + 1                             # conv stride 2, then pool 2
        assert numbers == {"audio_tokens_total": total, "audio_tokens_kept": samp.keep_count(total)}, numbers
        assert numbers["audio_tokens_kept"] < total
        assert r["usage"]["prompt_tokens_details"]["audio_tokens"] == numbers["audio_tokens_kept"]
        got[seconds] = r["usage"]["prompt_tokens"], numbers["audio_tokens_kept"]
    # the same prompt around a longer clip grows by exactly the extra kept tokens
    assert got[2.0][0] - got[1.0][0] == got[2.0][1] - got[1.0][1]
    text_only = chat(audio_server, audio_message("What is said?", None), max_tokens=2)
    assert "sgl_slim" not in text_only["metadata"]                            # nothing applies: no key


def test_no_s2o_numbers_left_behind_after_aborted_requests(spec_server):
    """Streams cut off mid-generation are aborted by SGLang; the scheduler's per-request S2O table must still end
    empty (sgl_slim_s2o_pending_requests, updated as requests finish, is 0 once the server is idle)."""
    import concurrent.futures as cf
    from sgl_slim.bench.probes import wait_until_idle

    def cut_off(i):
        body = {"text": " ".join(f"abort{i}x{j}" for j in range(90)), "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}}
        with requests.post(f"{spec_server.base_url}/generate", json=body, stream=True, timeout=600) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    break                                   # closing the connection aborts the request

    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(cut_off, range(4)))
    wait_until_idle(spec_server.base_url, timeout_s=120)
    generate(spec_server, " ".join(f"after{j}" for j in range(90)), max_new=2)     # one more finish: gauge update
    pending = scrape(spec_server).get(("sgl_slim_s2o_pending_requests", frozenset()))
    assert pending == 0.0, f"S2O numbers held for {pending} requests after the server went idle"
