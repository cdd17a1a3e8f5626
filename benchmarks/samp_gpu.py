"""Samp through SGLang on a Qwen2-Audio-7B-shape model: TTFT and requests/s of prompts with 30 s clips, merged
and pruned (the server's ``--samp-keep-ratio``, 0.6) against uncompressed (the same server, each request sending
``{"sgl_slim": {"samp_keep_ratio": 1.0}}``: Samp's identity), side by side in one run.

The model is built locally with random weights (``sgl_slim.random_vl.build_random_audio``: Qwen2-Audio-7B's audio
encoder and Qwen2-7B language model at their real sizes, the demo's 2,048-token vocabulary; ``--tiny``: the same
architecture at demo sizes, for a CPU dry run). ONE server is started by ``python -m sgl_slim.launch --samp``
(radix cache off; on a GPU host without sgl_kernel's compiled library the launcher's GPU stand-in mode, Triton
attention, no CUDA graphs). Every prompt carries ``--clips`` distinct generated clips of ``--clip-s`` seconds
(16 kHz WAV: a gliding tone with noise, ``benchmarks.samp_ttft.wav_b64``) and a short question, as a
``/generate`` request in the model's chat format. A 30 s clip is 750 audio tokens (Qwen2-Audio encodes 30 s
windows: 3,000 mel frames -> 1,500 encoder frames -> 750 pooled).

Phases, measurement and summary: ``benchmarks.toggle_gpu``.

Usage (on the GPU host after scripts/gpu_install.sh; ``scripts/gpu_toggle_bench.sh samp OUT``
does both):

    python -m benchmarks.samp_gpu --out OUT/samp_gpu.jsonl --logs OUT [--tiny]
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.samp_ttft import wav_b64
from benchmarks.toggle_gpu import UNPRUNED, Workload, run
from benchmarks.toggle_gpu import server_flags as toggle_flags
from sgl_slim.random_vl import AUDIO_SHAPES, build_random_audio

QUESTION = "What is said in these recordings, and how do they differ?"


def prompt_text(n_clips: int) -> str:
    clips = "".join(f"Audio {i + 1}: <|audio_bos|><|AUDIO|><|audio_eos|>\n" for i in range(n_clips))
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + clips + QUESTION
            + "<|im_end|>\n<|im_start|>assistant\n")


def request_body(clips: list[str], setting: str, max_new: int) -> dict:
    body = {"text": prompt_text(len(clips)), "audio_data": clips, "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}}
    if setting == UNPRUNED:
        body["sgl_slim"] = {"samp_keep_ratio": 1.0}
    return body


def server_flags(model: Path, args) -> list[str]:
    toggle = ["--samp", "--samp-keep-ratio", str(args.keep)]
    if args.merge_threshold is not None:
        toggle += ["--samp-merge-threshold", str(args.merge_threshold)]
    return toggle_flags(model, args, toggle)


def _add_args(ap) -> None:
    ap.add_argument("--keep", type=float, default=0.6, help="the server's --samp-keep-ratio")
    ap.add_argument("--clips", dest="per_prompt", type=int, default=1, help="clips per prompt")
    ap.add_argument("--clip-s", type=float, default=30.0, help="seconds per clip")
    ap.add_argument("--merge-threshold", type=float, default=None,
                    help="the server's --samp-merge-threshold (default: the server's; > 1: no merge, the DPP "
                         "selects every kept token)")


WORKLOAD = Workload(
    name="samp", media="audio", shapes=AUDIO_SHAPES, build_model=build_random_audio,
    make_media=lambda seed, args: wav_b64(args.clip_s, seed), request_body=request_body,
    server_flags=server_flags, add_args=_add_args)


def main(argv: list[str] | None = None) -> int:
    return run(WORKLOAD, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
