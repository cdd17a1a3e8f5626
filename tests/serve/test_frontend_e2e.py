"""The SGLang frontend programs in examples/ (sgl.function with an image, and with an audio clip) run against
the sgl_slim demo servers through SGLang's RuntimeEndpoint; the media go through sgl_slim's pruning."""

import base64
import importlib.util

import pytest

from serving import ROOT, png_data_url, wav_data_url

pytestmark = pytest.mark.e2e


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(tmp_path, data_url, name):
    path = tmp_path / name
    path.write_bytes(base64.b64decode(data_url.split(",", 1)[1]))
    return str(path)


@pytest.fixture(scope="module")
def sgl():
    return pytest.importorskip("sglang")


def _text_only(sgl, question):
    @sgl.function
    def text_only(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=1, temperature=0))
    return text_only.run(question=question)


def test_image_program(sgl, vl_server, tmp_path):
    ex = _load("frontend_image")
    ex.connect(vl_server.base_url)
    image = _write(tmp_path, png_data_url(seed=2), "img.png")
    first = ex.describe_image.run(image_path=image, question="Describe the image.")
    again = ex.describe_image.run(image_path=image, question="Describe the image.")
    assert isinstance(first["answer"], str) and first["answer"], first.text()
    assert first["colour"] in ex.COLOURS
    assert (again["answer"], again["colour"]) == (first["answer"], first["colour"])  # greedy: deterministic
    # the image reached the model pruned: <|vision_start|> + 64 * 0.25 kept + <|vision_end|> = 18 tokens more
    with_image = first.get_meta_info("answer")["prompt_tokens"]
    text_only = _text_only(sgl, "Describe the image.").get_meta_info("answer")["prompt_tokens"]
    assert with_image - text_only == 18, (with_image, text_only)


def test_image_program_batch(sgl, vl_server, tmp_path):
    ex = _load("frontend_image")
    ex.connect(vl_server.base_url)
    args = [{"image_path": _write(tmp_path, png_data_url(seed=i), f"img{i}.png"), "question": q}
            for i, q in enumerate(["What is this?", "Describe the image.", "Any squares?"])]
    states = ex.describe_image.run_batch(args, num_threads=3)
    assert all(s["answer"] and s["colour"] in ex.COLOURS for s in states), [s.text() for s in states]


def test_audio_program(sgl, audio_server, tmp_path):
    ex = _load("frontend_audio")
    ex.connect(audio_server.base_url)
    clip = _write(tmp_path, wav_data_url(seconds=2.0, seed=3), "clip.wav")
    first = ex.describe_clip.run(audio_path=clip, question="What is in this clip?")
    again = ex.describe_clip.run(audio_path=clip, question="What is in this clip?")
    assert isinstance(first["answer"], str) and first["answer"], first.text()
    assert first["kind"] in ("speech", "music", "noise")
    assert (again["answer"], again["kind"]) == (first["answer"], first["kind"])
    # the clip reached the model: 2 s is 50 audio tokens before Samp; Samp keeps fewer, never none
    with_clip = first.get_meta_info("answer")["prompt_tokens"]
    text_only = _text_only(sgl, "What is in this clip?").get_meta_info("answer")["prompt_tokens"]
    extra = with_clip - text_only
    assert 2 < extra < 50 + 2 + 8, (with_clip, text_only)


def test_a_streaming_program_with_a_bad_image_reports_the_servers_message(sgl, vl_server, tmp_path):
    """The server answers a bad streaming request with a 400 before the stream, so SGLang's client raises its
    message (stock: the error arrived as a stream event and the client failed with KeyError: 'text')."""
    ex = _load("frontend_image")
    ex.connect(vl_server.base_url)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image" * 10)
    state = ex.describe_image.run(image_path=str(bad), question="Describe the image.", stream=True)
    for _ in state.text_iter():          # waits for the program to end
        pass
    assert "Could not decode image" in str(state.error()), state.error()
    good = ex.describe_image.run(image_path=_write(tmp_path, png_data_url(seed=3), "ok.png"),
                                 question="Describe the image.", stream=True)
    assert "".join(good.text_iter("answer")) and good.error() is None
