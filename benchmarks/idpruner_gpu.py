"""IDPruner through SGLang on a Qwen2.5-VL-7B-shape model: TTFT and requests/s of 4-image prompts, pruned
(the server's ``--idpruner-keep-ratio``, 0.25) against unpruned (the same server, each request sending
``{"sgl_slim": {"idpruner_keep_ratio": 1.0}}``), side by side in one run.

The model is built locally with random weights (``sgl_slim.random_vl``: the 7B's vision tower and language model
at their real sizes, the demo's 2,048-token vocabulary; ``--tiny``: the same architecture at demo sizes, for a
CPU dry run). ONE server is started by ``python -m sgl_slim.launch --idpruner`` (radix cache off; on a GPU host
without sgl_kernel's compiled library the launcher's GPU stand-in mode, with Triton attention for the language
model and the vision tower and no CUDA graphs). Every prompt carries ``--images`` distinct generated JPEG
images of ``--image-size`` pixels square and a short question, as a ``/generate`` request with the model's chat
format; a prompt is sent once per setting, and no image is sent twice with the same setting, so the
embedding cache never skips the vision tower.

Phases, measurement and summary: ``benchmarks.toggle_gpu``.

Usage (on the GPU host after scripts/gpu_install.sh; scripts/gpu_toggle_bench.sh idpruner OUT does both):

    python -m benchmarks.idpruner_gpu --out OUT/idpruner_gpu.jsonl --logs OUT [--tiny]
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

from benchmarks.harness import wave_image
from benchmarks.toggle_gpu import UNPRUNED, Workload, run
from benchmarks.toggle_gpu import server_flags as toggle_flags
from sgl_slim.random_vl import SHAPES, build_random_vl

QUESTION = "Compare these pictures and describe what changes between them."


def image_data_url(seed: int, size: int) -> str:
    """A seeded RGB JPEG (:func:`benchmarks.harness.wave_image`) as a data URL."""
    return "data:image/jpeg;base64," + base64.b64encode(wave_image(seed, size, "JPEG")).decode()


def prompt_text(n_images: int) -> str:
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            + "<|vision_start|><|image_pad|><|vision_end|>" * n_images
            + QUESTION + "<|im_end|>\n<|im_start|>assistant\n")


def request_body(images: list[str], setting: str, max_new: int) -> dict:
    body = {"text": prompt_text(len(images)), "image_data": images, "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}}
    if setting == UNPRUNED:
        body["sgl_slim"] = {"idpruner_keep_ratio": 1.0}
    return body


def server_flags(model: Path, args) -> list[str]:
    # the stand-in mode's attention for the vision tower too (SGLang's vision default on Hopper is FA3, compiled)
    return toggle_flags(model, args, ["--idpruner", "--idpruner-keep-ratio", str(args.keep)],
                        gpu=("--mm-attention-backend", "triton_attn"))


def _add_args(ap) -> None:
    ap.add_argument("--keep", type=float, default=0.25, help="the server's --idpruner-keep-ratio")
    ap.add_argument("--images", dest="per_prompt", type=int, default=4, help="images per prompt")
    ap.add_argument("--image-size", type=int, default=None, help="square images, pixels (896; tiny 224)")


WORKLOAD = Workload(
    name="idp", media="vision", shapes=SHAPES, build_model=build_random_vl,
    make_media=lambda seed, args: image_data_url(seed, args.image_size), request_body=request_body,
    server_flags=server_flags, add_args=_add_args, tiny_defaults={"image_size": 224},
    gpu_defaults={"image_size": 896}, goals={"ttft": 2.5, "rps": 2.0})


def main(argv: list[str] | None = None) -> int:
    return run(WORKLOAD, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
