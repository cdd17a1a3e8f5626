"""End to end: the real SGLang server started by `python -m sgl_slim.launch` on the demo models (CPU), against
plain `python -m sglang.launch_server` on the same models with no plugin loaded."""

import psutil
import pytest

from serving import SlimServer, audio_message, greedy, image_message, png_data_url, wav_data_url

pytestmark = pytest.mark.e2e

COMMON = ["--dtype", "float32", "--max-total-tokens", "16384"]
PROMPTS = ["Describe the image.", "What colour is the square?"]


@pytest.fixture(scope="module")
def servers():
    """Four servers, started together (startup dominates): sgl_slim and plain SGLang, image and audio demos."""
    specs = {
        "slim_vl": SlimServer(["--model", "demo", *COMMON], port=30101),
        "plain_vl": SlimServer(["--model-path", "demo", *COMMON], port=30102, plain=True),
        "slim_audio": SlimServer(["--model", "demo-audio", *COMMON], port=30103),
        "plain_audio": SlimServer(["--model-path", "demo-audio", *COMMON], port=30104, plain=True),
    }
    try:
        for srv in specs.values():
            srv.start()
        for srv in specs.values():
            srv.wait_ready()
        yield specs
    finally:
        for srv in specs.values():
            srv.stop()


def test_image_request(servers):
    client = servers["slim_vl"].openai()
    with_image = greedy(client, image_message(PROMPTS[0], png_data_url()))
    text_only = greedy(client, image_message(PROMPTS[0], None))
    assert with_image.choices[0].message.content
    # a 224x224 image is (224 / 28)^2 = 64 LLM tokens, plus <|vision_start|> and <|vision_end|>
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + 64 + 2
    assert with_image.usage.prompt_tokens_details.image_tokens == 64


def test_audio_request(servers):
    client = servers["slim_audio"].openai()
    with_audio = greedy(client, audio_message("What is said?", wav_data_url(seconds=2.0)))
    text_only = greedy(client, audio_message("What is said?", None))
    assert with_audio.choices[0].message.content
    # 2 s at 16 kHz: 200 mel frames -> 100 encoder frames -> 50 tokens after pooling; the chat template adds
    # "Audio 1: <|audio_bos|>...<|audio_eos|>\n" around them
    extra = with_audio.usage.prompt_tokens - text_only.usage.prompt_tokens
    assert extra >= 50 + 2, extra
    assert extra <= 50 + 2 + 8, extra


@pytest.mark.parametrize("kind", ["vl", "audio"])
def test_greedy_output_equals_plain_sglang(servers, kind):
    slim, plain = servers[f"slim_{kind}"].openai(), servers[f"plain_{kind}"].openai()
    if kind == "vl":
        requests = [image_message(p, png_data_url(seed=i)) for i, p in enumerate(PROMPTS)] + \
                   [image_message("Plain text only.", None)]
    else:
        requests = [audio_message(p, wav_data_url(seconds=1.0 + i, seed=i)) for i, p in enumerate(PROMPTS)]
    for messages in requests:
        a, b = greedy(slim, messages, max_tokens=16), greedy(plain, messages, max_tokens=16)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage.prompt_tokens == b.usage.prompt_tokens


@pytest.mark.parametrize("name", ["slim_vl", "slim_audio"])
def test_sgl_slim_registered_in_the_scheduler_process(servers, name):
    srv = servers[name]
    roles = {}
    for pid in srv.registered_pids():
        try:
            roles[pid] = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
    assert any("sglang::scheduler" in role for role in roles.values()), roles
    assert any("sglang::detokenizer" in role for role in roles.values()), roles


def test_plain_server_has_no_sgl_slim(servers):
    assert servers["plain_vl"].registered_pids() == []
