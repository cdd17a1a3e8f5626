"""Embedded demo models: tiny, random-weight, built locally on first use (no download), cached.

- ``demo``: a tiny Qwen2.5-VL-architecture model (takes images).
- ``demo-audio``: a tiny Qwen2-Audio-architecture model (takes audio).

The weights are RANDOM (seeded): the demo proves the serving machinery, not answer quality. The tokenizer is a
real byte-level BPE trained here with ``tokenizers`` on the running Python's standard-library source, with the
Qwen family's special tokens and a Qwen-style chat template (text, images, audio).

Build is deterministic for a given sgl_slim version, Python version and transformers version (fixed seeds,
sorted corpus); those three make up the cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

BUILDER_VERSION = 1
SEED = 0
VOCAB_SIZE = 2048
DEMO_NAMES = ("demo", "demo-audio")

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>",
]

# Qwen-style chat template for text, images, video and audio content parts.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}{%- set audio_count = namespace(value=0) -%}"
    "{%- if messages[0]['role'] != 'system' -%}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{%- endif -%}"
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] in ('video', 'video_url') or 'video' in part -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif part['type'] in ('audio', 'audio_url', 'input_audio') or 'audio' in part or 'audio_url' in part -%}"
    "{%- set audio_count.value = audio_count.value + 1 -%}Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
)

# Image side: 28x28 pixels per LLM token (patch 14, merge 2); 4 to 256 tokens per image.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 256 * 28 * 28


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sgl_slim" / "models"


def _cache_key(name: str, overrides: dict) -> str:
    import transformers  # noqa: PLC0415

    key = json.dumps({"name": name, "builder": BUILDER_VERSION, "python": sys.version_info[:2],
                      "transformers": transformers.__version__, "overrides": overrides}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def ensure_demo(name: str, **overrides) -> Path:
    """The directory of demo model ``name``, building it on first use."""
    if name not in DEMO_NAMES:
        raise ValueError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO_NAMES)}")
    out = cache_root() / f"{name}-{_cache_key(name, overrides)}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    build_demo(name, tmp, **overrides)
    (tmp / ".complete").write_text("ok\n")
    if out.exists():  # another process finished first
        import shutil  # noqa: PLC0415
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


def _corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    return files[:120]


def train_tokenizer(out_dir: Path):
    """Byte-level BPE trained on standard-library source; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in _corpus_files()]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE)
    fast.model_max_length = TEXT_CONFIG["max_position_embeddings"]
    fast.save_pretrained(out_dir)
    return fast


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_demo(name: str, out_dir: str | os.PathLike, **overrides) -> Path:
    """Build demo model ``name`` into ``out_dir``. ``overrides`` update the text config (e.g. a larger size)."""
    import torch  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], **overrides)
    torch.manual_seed(SEED)
    if name == "demo":
        _build_vl(out_dir, tokenizer, ids, text)
    elif name == "demo-audio":
        _build_audio(out_dir, tokenizer, ids, text)
    else:
        raise ValueError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO_NAMES)}")
    _write_json(out_dir / "generation_config.json",
                {"do_sample": False, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                 "pad_token_id": ids["<|endoftext|>"]})
    (out_dir / "README.md").write_text(
        f"# sgl_slim {name}\n\nTiny model with RANDOM weights (seed {SEED}), built by sgl_slim.demo. "
        "It proves the serving machinery; its answers are noise.\n")
    return out_dir


def _build_vl(out_dir: Path, tokenizer, ids: dict, text: dict) -> None:
    from transformers import (  # noqa: PLC0415
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor)

    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # (t, h, w), sums to head_dim / 2
    text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                  out_hidden_size=text["hidden_size"], tokens_per_second=2)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch_float32())
    model.save_pretrained(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["vision_config"]["in_chans"] = 3  # SGLang's Qwen2VisionTransformer reads in_chans
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    _write_json(out_dir / "config.json", cfg)
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=_video_processor(), chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)


def _video_processor():
    try:
        from transformers import Qwen2VLVideoProcessor  # noqa: PLC0415
    except ImportError:
        return None
    return Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _build_audio(out_dir: Path, tokenizer, ids: dict, text: dict) -> None:
    from safetensors.torch import load_file, save_file  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415
        Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, WhisperFeatureExtractor)

    text = dict(text, model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    audio = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=128,
                 max_source_positions=1500)
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=ids["<|AUDIO|>"])
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    model = Qwen2AudioForConditionalGeneration(config).to(torch_float32())
    model.save_pretrained(out_dir)
    # transformers 5 writes language_model.model.model.*; SGLang's loader wants language_model.model.*
    for shard in out_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        renamed = {k.replace("language_model.model.model.", "language_model.model."): v for k, v in tensors.items()}
        save_file(renamed, shard, metadata={"format": "pt"})
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    _write_json(out_dir / "config.json", cfg)
    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)


def torch_float32():
    import torch  # noqa: PLC0415
    return torch.float32


if __name__ == "__main__":
    for arg in sys.argv[1:] or DEMO_NAMES:
        print(ensure_demo(arg))
