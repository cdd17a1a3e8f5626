"""Random-weight Qwen2.5-VL and Qwen2-Audio models at a named shape, written as a HF directory SGLang loads
(nothing downloaded).

- ``7b``: Qwen2.5-VL-7B-Instruct's shapes. Language model: hidden 3584, 28 layers, 28 query heads, 4 KV heads
  (head dim 128), MLP 18944, rope theta 1e6, M-RoPE sections (16, 24, 24). Vision tower: depth 32, hidden 1280,
  MLP 3420, 16 heads, patch 14, temporal patch 2, spatial merge 2, window 112 with full attention in blocks
  7, 15, 23, 31, output 3584. 7.2B parameters with this vocabulary (8.3B with the real one), 14.4 GB in bf16.
- ``tiny``: the same architecture at the demo's sizes, for CPU tests.
- Qwen2-Audio (``build_random_audio``, :data:`AUDIO_SHAPES`): ``7b`` = Qwen2-Audio-7B's shapes (audio encoder d 1280,
  32 layers, 20 heads, FFN 5120, 128 mel bins; Qwen2-7B language model: hidden 4096, 32 layers, 32 heads (no
  GQA), MLP 11008, rope theta 1e4), 7.1B parameters with this vocabulary (8.4B with the real one); ``tiny`` for
  CPU tests.

One difference from the real model on purpose: the vocabulary is the demo's 2,048-token byte-level BPE
(``sgl_slim.demo.train_tokenizer``, with the Qwen special tokens and chat template) instead of 152,064 tokens.
It changes only the embedding lookup and the LM head, which runs on one row per sequence in prefill.

The weights are drawn directly on the target device in the target dtype (normal, std 0.02; norms 1, biases 0),
one tensor at a time from a meta-device model's parameter list, so an 8B-parameter model is built in seconds on
a GPU without a CPU initialisation; they are written in shards in the checkpoint layout that
``save_pretrained`` writes (``model.*``, ``visual.*``, ``lm_head.*``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

SHAPES = {
    "7b": {
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     hidden_act="silu", tie_word_embeddings=False, sliding_window=32768, use_sliding_window=False,
                     max_window_layers=28,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584, tokens_per_second=2,
                       hidden_act="silu"),
        # Qwen2.5-VL-7B-Instruct's preprocessor limits: 4 to 16,384 LLM tokens per image
        "min_pixels": 3136, "max_pixels": 12845056,
    },
    "tiny": {
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                     tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                       out_hidden_size=64, tokens_per_second=2, hidden_act="silu"),
        "min_pixels": 4 * 28 * 28, "max_pixels": 1024 * 28 * 28,
    },
}
AUDIO_SHAPES = {
    # Qwen2-Audio-7B-Instruct: Whisper-large-v3-size encoder (128 mel bins, 30 s windows -> 1,500 frames, pooled
    # to 750 LLM tokens), a linear projector, and a Qwen2-7B language model (multi-head attention)
    "7b": {
        "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
                     tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "audio": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                      num_mel_bins=128, max_source_positions=1500),
    },
    "tiny": {
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_act="silu",
                     tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        "audio": dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=128,
                      max_source_positions=1500),
    },
}
SHARD_BYTES = 4 << 30


def checkpoint_name(param_name: str) -> str:
    """The checkpoint key of an in-memory parameter name (transformers 5 nests both towers under ``model.``)."""
    if param_name.startswith("model.visual."):
        return "visual." + param_name[len("model.visual."):]
    if param_name.startswith("model.language_model."):
        return "model." + param_name[len("model.language_model."):]
    return param_name


def build_random_vl(out_dir: str | os.PathLike, shape: str = "7b", *, device: str | None = None,
                    dtype=None, seed: int = 0, std: float = 0.02) -> Path:
    """Write a random-weight Qwen2.5-VL of ``shape`` (a key of :data:`SHAPES`) with its tokenizer and processor
    into ``out_dir``. ``device``: where the weights are drawn (default cuda when present); ``dtype``: default
    bf16 on cuda, fp32 on the CPU."""
    import torch  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor)

    from sgl_slim.demo import CHAT_TEMPLATE, _video_processor  # noqa: PLC0415

    spec, device, dtype, out_dir, tokenizer, ids, text = _start(out_dir, shape, SHAPES, device, dtype)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(spec["vision"]), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    with torch.device("meta"):
        shapes = {checkpoint_name(k): tuple(v.shape)
                  for k, v in Qwen2_5_VLForConditionalGeneration(config).state_dict().items()}

    write_random_weights(out_dir, shapes, device=device, dtype=dtype, seed=seed, std=std)

    cfg = _save_configs(out_dir, config, ids, dtype)
    cfg["vision_config"]["in_chans"] = 3  # SGLang's Qwen2VisionTransformer reads in_chans
    _write_json(out_dir / "config.json", cfg)
    image_processor = Qwen2VLImageProcessor(min_pixels=spec["min_pixels"], max_pixels=spec["max_pixels"])
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=_video_processor(), chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    _readme(out_dir, "Qwen2.5-VL", shape, seed, std, dtype, shapes)
    return out_dir


def audio_checkpoint_name(param_name: str) -> str:
    """The checkpoint key SGLang's Qwen2-Audio loader reads for an in-memory (transformers 5) parameter name: the
    original checkpoint layout (``audio_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
    ``language_model.lm_head.*``), which transformers loads too."""
    if param_name.startswith("model.language_model."):
        return "language_model.model." + param_name[len("model.language_model."):]
    if param_name.startswith("model."):
        return param_name[len("model."):]
    return "language_model." + param_name


def build_random_audio(out_dir: str | os.PathLike, shape: str = "7b", *, device: str | None = None,
                       dtype=None, seed: int = 0, std: float = 0.02) -> Path:
    """Write a random-weight Qwen2-Audio of ``shape`` (a key of :data:`AUDIO_SHAPES`) with its tokenizer and
    processor into ``out_dir`` (as :func:`build_random_vl`)."""
    import torch  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415
        Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, WhisperFeatureExtractor)

    from sgl_slim.demo import CHAT_TEMPLATE  # noqa: PLC0415

    spec, device, dtype, out_dir, tokenizer, ids, text = _start(out_dir, shape, AUDIO_SHAPES, device, dtype)
    text["model_type"] = "qwen2"
    config = Qwen2AudioConfig(audio_config=dict(spec["audio"]), text_config=text,
                              audio_token_index=ids["<|AUDIO|>"])
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    with torch.device("meta"):
        shapes = {audio_checkpoint_name(k): tuple(v.shape)
                  for k, v in Qwen2AudioForConditionalGeneration(config).state_dict().items()}
    write_random_weights(out_dir, shapes, device=device, dtype=dtype, seed=seed, std=std)
    _save_configs(out_dir, config, ids, dtype)
    extractor = WhisperFeatureExtractor(feature_size=spec["audio"]["num_mel_bins"], sampling_rate=16000)
    Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer,
                        chat_template=CHAT_TEMPLATE).save_pretrained(out_dir)
    _readme(out_dir, "Qwen2-Audio", shape, seed, std, dtype, shapes)
    return out_dir


def _start(out_dir, shape: str, shapes: dict, device, dtype):
    """The builders' shared start: the shape checked, device and dtype resolved, the tokenizer trained into
    ``out_dir``; returns (spec, device, dtype, out_dir, tokenizer, special-token ids, text config)."""
    import torch  # noqa: PLC0415

    from sgl_slim.demo import SPECIAL_TOKENS, train_tokenizer  # noqa: PLC0415

    if shape not in shapes:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(shapes)}")
    spec = shapes[shape]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(spec["text"], vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"])
    return spec, device, dtype, out_dir, tokenizer, ids, text


def _save_configs(out_dir: Path, config, ids: dict, dtype) -> dict:
    """config.json (with the weights' dtype) and generation_config.json; returns the written config dict."""
    config.save_pretrained(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_json(out_dir / "config.json", cfg)
    _write_json(out_dir / "generation_config.json",
                {"do_sample": False, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                 "pad_token_id": ids["<|endoftext|>"]})
    return cfg


def _readme(out_dir: Path, kind: str, shape: str, seed: int, std: float, dtype, shapes: dict) -> None:
    (out_dir / "README.md").write_text(
        f"# Random-weight {kind}, shape {shape}\n\nBuilt by sgl_slim.random_vl (seed {seed}, std {std}, "
        f"{str(dtype).removeprefix('torch.')}); {sum(math.prod(s) for s in shapes.values()):,} parameters. "
        "Its answers are noise.\n")


def write_random_weights(out_dir: Path, shapes: dict, *, device: str, dtype, seed: int = 0,
                         std: float = 0.02) -> None:
    """Write {checkpoint key: shape} as random weights (normal, std ``std``; norms 1, biases 0) drawn on
    ``device`` one tensor at a time, in safetensors shards with their index."""
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(shapes):
        shp = shapes[name]
        if name.endswith(".bias"):
            t = torch.zeros(shp, dtype=dtype, device=device)
        elif len(shp) == 1:   # RMSNorm weights
            t = torch.ones(shp, dtype=dtype, device=device)
        else:
            t = torch.randn(shp, generator=gen, dtype=dtype, device=device).mul_(std)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        total += sum(v.numel() * v.element_size() for v in shard.values())
        shard.clear()
    _write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                            "weight_map": weight_map})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Build a random-weight Qwen2.5-VL (or Qwen2-Audio) of a named shape.")
    ap.add_argument("out_dir")
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--audio", action="store_true", help="a Qwen2-Audio instead of a Qwen2.5-VL")
    cli = ap.parse_args()
    print((build_random_audio if cli.audio else build_random_vl)(cli.out_dir, cli.shape))
