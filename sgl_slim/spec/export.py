"""Write / read a draft in SGLang's EAGLE-3 checkpoint format (``LlamaForCausalLMEagle3``).

Files: ``config.json`` (Llama config + ``draft_vocab_size``, ``target_hidden_size``,
``eagle_config.eagle_aux_hidden_state_layer_ids``) and ``model.safetensors`` with ``fc.weight``,
``midlayer.*``, ``norm.weight``, ``lm_head.weight``, ``d2t`` (int64, target id minus draft id) and ``t2d``
(bool). The token embedding is not written: the draft's hidden size equals the target's, and SGLang then
shares the target's embedding with the draft.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sgl_slim.spec.draft import DraftConfig, Eagle3Draft

ARCHITECTURE = "LlamaForCausalLMEagle3"
_MIDLAYER = ("input_layernorm", "hidden_norm", "self_attn", "post_attention_layernorm", "mlp")


def hf_config(cfg: DraftConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids),
            "use_aux_hidden_state": True,
        },
        "sgl_slim": cfg.to_dict(),
    }


def _export_name(name: str) -> str | None:
    if name.startswith("embed_tokens."):
        return None
    if name.startswith(_MIDLAYER):
        return "midlayer." + name
    return name


def export_eagle3(draft: Eagle3Draft, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``draft`` to ``out_dir`` in SGLang's EAGLE-3 format; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in draft.state_dict().items():
        target = _export_name(name)
        if target is None:
            continue
        value = value.detach().cpu().contiguous()
        if value.is_floating_point():
            value = value.to(dtype)
        tensors[target] = value.clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(draft.cfg, dtype), indent=2) + "\n")
    return out


def load_eagle3(path: str | Path, embed_weight: torch.Tensor) -> Eagle3Draft:
    """Read an export back (``embed_weight`` [vocab, hidden] is the target's token embedding)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if ARCHITECTURE not in config.get("architectures", []):
        raise ValueError(f"{path}: architectures {config.get('architectures')} is not [{ARCHITECTURE!r}]")
    raw = dict(config["sgl_slim"])
    raw["aux_layer_ids"] = tuple(raw["aux_layer_ids"])
    draft = Eagle3Draft(DraftConfig(**raw))
    state = {}
    for name, value in load_file(path / "model.safetensors").items():
        ours = name.removeprefix("midlayer.")
        state[ours] = value
    state["embed_tokens.weight"] = embed_weight
    draft.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return draft
