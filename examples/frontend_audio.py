"""SGLang frontend program with an audio clip, against an sgl_slim server on an audio model (e.g.
`python -m sgl_slim.launch --recipe demo-audio --port 30000`), through SGLang's frontend runtime endpoint.

    python examples/frontend_audio.py --base-url http://127.0.0.1:30000 --audio clip.wav

SGLang 0.5.23's frontend has `sgl.image` and `sgl.video` but no `sgl.audio`, and `RuntimeEndpoint` sends a
program's media as `image_data` only. `AudioRuntimeEndpoint` below (a few lines) sends the program's media
item as `audio_data` instead, and the chat template's media token is Qwen2-Audio's placeholder, so `clip(...)`
(= `sgl.image`) places an audio clip.
"""

from __future__ import annotations

import argparse

import sglang as sgl
from sglang.lang.chat_template import ChatTemplate, ChatTemplateStyle, get_chat_template, register_chat_template

TEMPLATE = "sgl-slim-qwen2-audio"
register_chat_template(ChatTemplate(
    name=TEMPLATE,
    default_system_prompt="You are a helpful assistant.",
    role_prefix_and_suffix={
        "system": ("<|im_start|>system\n", "<|im_end|>\n"),
        "user": ("<|im_start|>user\n", "<|im_end|>\n"),
        "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
    },
    style=ChatTemplateStyle.PLAIN,
    stop_str=("<|im_end|>",),
    image_token="Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n",
))

clip = sgl.image  # the frontend's media primitive; AudioRuntimeEndpoint sends it as audio


class AudioRuntimeEndpoint(sgl.RuntimeEndpoint):
    """RuntimeEndpoint that sends the program's one media item as ``audio_data`` (a WAV data URL)."""

    def __init__(self, base_url: str, **kwargs):
        super().__init__(base_url, **kwargs)
        self.chat_template = get_chat_template(TEMPLATE)

    def _add_images(self, s, data):
        if s.images_:
            if len(s.images_) != 1:
                raise ValueError(f"one audio clip per program, got {len(s.images_)}")
            data["audio_data"] = "data:audio/wav;base64," + s.images_[0][1]


@sgl.function
def describe_clip(s, audio_path: str, question: str, max_tokens: int = 16):
    s += sgl.user(clip(audio_path) + question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))
    s += sgl.user("Is it speech or music? One word.")
    s += sgl.assistant(sgl.select("kind", choices=["speech", "music", "noise"]))


def connect(base_url: str) -> AudioRuntimeEndpoint:
    backend = AudioRuntimeEndpoint(base_url)
    sgl.set_default_backend(backend)
    return backend


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--audio", required=True, help="a WAV file (16 kHz is what Qwen2-Audio takes)")
    p.add_argument("--question", default="What is in this clip?")
    args = p.parse_args(argv)
    connect(args.base_url)
    state = describe_clip.run(audio_path=args.audio, question=args.question)
    print(f"answer: {state['answer']!r}\nkind: {state['kind']}")


if __name__ == "__main__":
    main()
