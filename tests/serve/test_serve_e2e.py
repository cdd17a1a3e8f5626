"""End to end: the real SGLang server started by `python -m sgl_slim.launch` on the demo models (CPU), against
plain `python -m sglang.launch_server` on the same models with no plugin loaded."""

import time

import psutil
import pytest

from serving import audio_message, greedy, image_message, png_data_url, shared_server, wav_data_url

pytestmark = pytest.mark.e2e

COMMON = ["--dtype", "float32", "--max-total-tokens", "16384"]
PROMPTS = ["Describe the image.", "What colour is the square?"]

# sgl_slim with no toggle and stock SGLang, image and audio demos. The image tests come first and the audio ones
# after, so the pool has at most two of these four servers alive at a time.
slim_vl = shared_server(["--model", "demo", *COMMON])
plain_vl = shared_server(["--model-path", "demo", *COMMON], plain=True)
slim_audio = shared_server(["--model", "demo-audio", *COMMON])
plain_audio = shared_server(["--model-path", "demo-audio", *COMMON], plain=True)


def assert_registered_in_the_scheduler_process(srv):
    roles = {}
    for pid in srv.registered_pids():
        try:
            roles[pid] = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
    assert any("sglang::scheduler" in role for role in roles.values()), roles
    assert any("sglang::detokenizer" in role for role in roles.values()), roles


def assert_same_greedy_outputs(slim, plain, requests):
    for messages in requests:
        a, b = greedy(slim, messages, max_tokens=16), greedy(plain, messages, max_tokens=16)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_image_request(slim_vl):
    client = slim_vl.openai()
    with_image = greedy(client, image_message(PROMPTS[0], png_data_url()))
    text_only = greedy(client, image_message(PROMPTS[0], None))
    assert with_image.choices[0].message.content
    # a 224x224 image is (224 / 28)^2 = 64 LLM tokens, plus <|vision_start|> and <|vision_end|>
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + 64 + 2
    assert with_image.usage.prompt_tokens_details.image_tokens == 64


def test_image_greedy_output_equals_plain_sglang(slim_vl, plain_vl):
    requests = [image_message(p, png_data_url(seed=i)) for i, p in enumerate(PROMPTS)] + \
               [image_message("Plain text only.", None)]
    assert_same_greedy_outputs(slim_vl.openai(), plain_vl.openai(), requests)


def test_sgl_slim_registered_in_the_image_servers_scheduler_process(slim_vl):
    assert_registered_in_the_scheduler_process(slim_vl)


def scheduler_loop_cpu(srv) -> float:
    """CPU seconds used so far by the scheduler process's main thread (its event loop). The process's other
    threads (torch.distributed's gloo loops) wake on their own timers, whatever the loop does."""
    (scheduler,) = [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
                    if "sglang::scheduler" in " ".join(p.cmdline())]
    (main,) = [t for t in scheduler.threads() if t.id == scheduler.pid]
    return main.user_time + main.system_time


def test_an_idle_scheduler_sleeps(slim_vl):
    # the launcher's CPU default --sleep-on-idle: an idle scheduler loop waits on its sockets instead of polling
    # them (measured on a 2-core machine, the loop thread alone: polling 5.0 s of CPU in 5 s, sleeping 0.00-0.01 s)
    before = scheduler_loop_cpu(slim_vl)
    time.sleep(5)
    used = scheduler_loop_cpu(slim_vl) - before
    assert used < 0.25, f"an idle scheduler loop used {used:.2f} s of CPU in 5 s"


def test_plain_server_has_no_sgl_slim(plain_vl):
    assert plain_vl.registered_pids() == []


def test_audio_request(slim_audio):
    client = slim_audio.openai()
    with_audio = greedy(client, audio_message("What is said?", wav_data_url(seconds=2.0)))
    text_only = greedy(client, audio_message("What is said?", None))
    assert with_audio.choices[0].message.content
    # 2 s at 16 kHz: 200 mel frames -> 100 encoder frames -> 50 tokens after pooling; the chat template adds
    # "Audio 1: <|audio_bos|>...<|audio_eos|>\n" around them
    extra = with_audio.usage.prompt_tokens - text_only.usage.prompt_tokens
    assert extra >= 50 + 2, extra
    assert extra <= 50 + 2 + 8, extra


def test_audio_greedy_output_equals_plain_sglang(slim_audio, plain_audio):
    requests = [audio_message(p, wav_data_url(seconds=1.0 + i, seed=i)) for i, p in enumerate(PROMPTS)]
    assert_same_greedy_outputs(slim_audio.openai(), plain_audio.openai(), requests)


def test_sgl_slim_registered_in_the_audio_servers_scheduler_process(slim_audio):
    assert_registered_in_the_scheduler_process(slim_audio)
