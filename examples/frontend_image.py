"""SGLang frontend program with an image, against an sgl_slim server (e.g. `python -m sgl_slim.launch --recipe
demo --port 30000`), through SGLang's frontend runtime endpoint.

    python examples/frontend_image.py --base-url http://127.0.0.1:30000 --image cat.png

The program asks a free-form question about the image, then a constrained one (`sgl.select` scores each
choice on the server with the image in the prompt, so the pruned image tokens are what the model sees).
"""

from __future__ import annotations

import argparse

import sglang as sgl

COLOURS = ["red", "green", "blue", "yellow"]


@sgl.function
def describe_image(s, image_path: str, question: str, max_tokens: int = 16):
    s += sgl.user(sgl.image(image_path) + question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))
    s += sgl.user("Which colour dominates the picture? One word.")
    s += sgl.assistant(sgl.select("colour", choices=COLOURS))


def connect(base_url: str) -> sgl.RuntimeEndpoint:
    """The frontend backend for a Qwen2.5-VL sgl_slim server (its chat template is chosen by name because
    the frontend cannot infer it from a local demo model path)."""
    backend = sgl.RuntimeEndpoint(base_url, chat_template_name="qwen2-vl")
    sgl.set_default_backend(backend)
    return backend


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--question", default="Describe the image.")
    args = p.parse_args(argv)
    connect(args.base_url)
    state = describe_image.run(image_path=args.image, question=args.question)
    print(f"answer: {state['answer']!r}\ncolour: {state['colour']}")


if __name__ == "__main__":
    main()
