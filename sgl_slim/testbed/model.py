"""The testbed model: a standard Hugging Face LlamaForCausalLM (RMSNorm, SwiGLU, RoPE base 500000, GQA 4:1,
head dim 128), small enough that its bf16 safetensors travel (about 46 MiB at the default size).

Default size (``ModelSpec()``): hidden 512, 6 layers, 8 query heads x 128 (q_proj 512 -> 1024), 2 KV heads,
SwiGLU 1536, vocabulary 2048 (the byte-level BPE of ``sgl_slim.demo.train_tokenizer``), tied embeddings:
23.2M parameters.  The attention shape (8 q heads, 2 KV heads, d 128) is Llama-3's per-KV-group shape.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

ROPE_THETA = 500000.0


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 128
    intermediate_size: int = 1536
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


TINY = ModelSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=32, intermediate_size=128,
                 max_position_embeddings=8192)


def llama_config(spec: ModelSpec, tokenizer):
    """transformers LlamaConfig for ``spec`` with the tokenizer's vocabulary and special ids."""
    from transformers import LlamaConfig  # noqa: PLC0415

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, hidden_act="silu",
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        attention_bias=False, mlp_bias=False)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def build_model(spec: ModelSpec, tokenizer, *, seed: int):
    """A freshly initialised LlamaForCausalLM (fp32), seeded."""
    import torch  # noqa: PLC0415
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = llama_config(spec, tokenizer)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def save_checkpoint(model, tokenizer, out_dir: str | Path, *, record: dict) -> Path:
    """Save as a standard HF directory (bf16 safetensors, tokenizer, generation config, the run's record)."""
    import torch  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "eos_token_id": eos, "pad_token_id": eos}, indent=2) + "\n")
    (out_dir / "testbed_record.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return out_dir


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype=None, attn_implementation: str = "sdpa"):
    """LlamaForCausalLM from ``model_dir`` in eval mode (dtype defaults to bf16 on CUDA, fp32 elsewhere)."""
    import torch  # noqa: PLC0415
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval()


def llama3_rope(factor: float, original: int = 32768) -> dict:
    """Llama-3.1's RoPE scaling by ``factor`` from ``original`` positions (low / high frequency factors 1 / 4): how
    the model, trained at 32K, is evaluated and served beyond that (benchmarks/testbed.md, extrapolation)."""
    return {"rope_type": "llama3", "rope_theta": ROPE_THETA, "factor": float(factor), "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": int(original)}


def with_rope_scaling(model_dir: str | Path, out_dir: str | Path, factor: float, original: int = 32768) -> Path:
    """A checkpoint directory serving ``model_dir``'s weights with ``llama3_rope(factor, original)``: its files
    linked, its config rewritten with the scaling (as ``rope_parameters``, transformers 5's name, and
    ``rope_scaling``, the name other loaders read) and room for 2 x factor x original positions.  Links already
    in ``out_dir`` (from an earlier call, maybe for another checkpoint) are replaced."""
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if old.is_symlink():
            old.unlink()
    for f in model_dir.iterdir():
        if f.name != "config.json" and f.is_file():
            (out_dir / f.name).symlink_to(f)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rope_parameters"] = cfg["rope_scaling"] = llama3_rope(factor, original)
    cfg["max_position_embeddings"] = int(2 * factor * original)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out_dir


def spec_dict(spec: ModelSpec) -> dict:
    return asdict(spec)
