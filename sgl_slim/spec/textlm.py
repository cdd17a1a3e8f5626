"""A plain-torch Qwen2/Llama text decoder that reads (and writes back) the language part of a checkpoint.

It is the target model for draft training and the model that ``target_lm`` trains. It reads the tensors
of a Hugging Face checkpoint by name, whatever prefix the architecture puts in front of them
(``model.``, ``model.language_model.``, ``language_model.model.``), so the trained weights can be written
back under the same names and SGLang serves them unchanged.

Text-only positions of an M-RoPE model (Qwen2-VL / Qwen2.5-VL) are equal on all three axes, which is
ordinary 1-D RoPE; that is what this module implements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: dict) -> "TextConfig":
        """The text decoder's settings from a config.json (top level or its ``text_config``)."""
        text = dict(config)
        text.update(config.get("text_config") or {})
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        theta = text.get("rope_theta", rope.get("rope_theta", 10000.0))
        heads = text["num_attention_heads"]
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=text.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer ``positions`` (any shape) -> [..., head_dim] each (neox layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq          # [..., head_dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos/sin: [B, S, D] (or [S, D])."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, in_features: int, qkv_bias: bool):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(in_features, cfg.num_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(in_features, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(in_features, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [B, S, in] -> q [B, Hq, S, D], k/v [B, Hkv, S, D] with RoPE applied to q and k."""
        b, s, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(b, s, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, d).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """q: [B, Hq, S, D]; k/v: [B, Hkv, T, D]; mask: bool [S, T] or [B, 1, S, T] (True = attend)."""
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, qkv_bias: bool):
        super().__init__()
        self.cfg = cfg
        self.self_attn = Attention(cfg, cfg.hidden_size, qkv_bias)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, past: tuple | None):
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        causal = past is None or q.shape[2] > 1
        mask = None
        if past is not None and q.shape[2] > 1:   # new queries see the whole cache and are causal among themselves
            s, t = q.shape[2], k.shape[2]
            mask = torch.ones(s, t, dtype=torch.bool, device=x.device).tril(t - s)
        x = x + self.self_attn.attend(q, k, v, mask, causal)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, (k, v)


def _find_prefix(names: list[str]) -> str:
    """The prefix in front of ``embed_tokens.weight`` of the text model (never a vision/audio tower)."""
    hits = [n[: -len("embed_tokens.weight")] for n in names if n.endswith("embed_tokens.weight")]
    hits = [h for h in hits if not any(t in h for t in ("visual", "vision", "audio"))]
    if len(hits) != 1:
        raise ValueError(f"expected one text embed_tokens.weight in the checkpoint, found prefixes {hits}")
    return hits[0]


class TextLM(nn.Module):
    """The text decoder: ``forward(input_ids, past)`` -> (last-layer normed hidden, per-layer hiddens, past)."""

    def __init__(self, cfg: TextConfig, qkv_bias: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.names: dict[str, str] = {}     # our parameter name -> checkpoint tensor name

    # ---- checkpoint I/O ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "TextLM":
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        cfg = TextConfig.from_hf(config)
        tensors = _load_all(path)
        prefix = _find_prefix(list(tensors))
        qkv_bias = f"{prefix}layers.0.self_attn.q_proj.bias" in tensors
        model = cls(cfg, qkv_bias)
        head = next((n for n in ("lm_head.weight", prefix.replace("model.", "", 1) + "lm_head.weight",
                                 "language_model.lm_head.weight") if n in tensors), None)
        if head is None and not cfg.tie_word_embeddings:
            raise ValueError(f"{path}: no lm_head.weight and tie_word_embeddings is false")
        for name, _ in model.named_parameters():
            if name == "lm_head.weight":
                if head is None:
                    continue
                model.names[name] = head
            else:
                model.names[name] = prefix + name
        state = {}
        for ours, theirs in model.names.items():
            if theirs not in tensors:
                raise ValueError(f"{path}: missing tensor {theirs} (for {ours})")
            state[ours] = tensors[theirs]
        missing, _ = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and head is None)]
        if missing:
            raise ValueError(f"{path}: parameters not found in the checkpoint: {missing}")
        return model.to(dtype)

    def save_text_weights(self, path: str | Path) -> None:
        """Write this model's weights back over the same tensor names, in the same files and dtypes."""
        path = Path(path)
        ours = dict(self.named_parameters())
        by_name = {theirs: ours[mine] for mine, theirs in self.names.items()}
        for file in sorted(path.glob("*.safetensors")):
            tensors = load_file(file)
            changed = False
            for name in tensors:
                if name in by_name:
                    tensors[name] = by_name[name].detach().to(tensors[name].dtype).contiguous().clone()
                    changed = True
            if changed:
                save_file(tensors, file, metadata={"format": "pt"})

    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.float32, **config_extra) -> Path:
        """Write this decoder as a new Hugging Face checkpoint that transformers and SGLang load: ``config.json``
        (``Qwen2ForCausalLM`` when q/k/v have biases, else ``LlamaForCausalLM``; ``config_extra`` adds keys such
        as the tokenizer's ``eos_token_id``) and ``model.safetensors`` (``model.*`` and ``lm_head.weight``,
        floats in ``dtype``). Other files in ``path`` (a tokenizer) are left alone. Returns ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        c = self.cfg
        qkv_bias = self.layers[0].self_attn.q_proj.bias is not None
        config = {
            "architectures": ["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"],
            "model_type": "qwen2" if qkv_bias else "llama",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu",
            "torch_dtype": str(dtype).removeprefix("torch."),
            **({} if qkv_bias else {"attention_bias": False, "mlp_bias": False}),
            **config_extra,
        }
        # a tied lm_head is the embedding's Parameter: named_parameters() yields it once, as embed_tokens.weight
        tensors = {(name if name == "lm_head.weight" else "model." + name): p.detach().to("cpu", dtype).contiguous()
                   for name, p in self.named_parameters()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return path

    # ---- compute -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, past: list | None = None, start: int = 0):
        """input_ids: [B, S] at positions start..start+S-1.

        Returns (hidden [B, S, H] after the final norm, hiddens: list of L+1 [B, S, H] — index 0 is the
        embedding, index k+1 is layer k's output, as transformers' ``output_hidden_states`` — and past).
        """
        x = self.embed_tokens(input_ids)
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        hiddens = [x]
        new_past = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos.to(x.dtype), sin.to(x.dtype), None if past is None else past[i])
            hiddens.append(x)
            new_past.append(kv)
        return self.norm(x), hiddens, new_past

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation of equal-length prompts [B, S] -> new tokens [B, max_new_tokens]."""
        hidden, _, past = self.forward(input_ids)
        out = []
        tok = self.logits(hidden[:, -1]).argmax(-1)
        pos = input_ids.shape[1]
        for _ in range(max_new_tokens):
            out.append(tok)
            if len(out) == max_new_tokens:
                break
            hidden, _, past = self.forward(tok[:, None], past, start=pos)
            pos += 1
            tok = self.logits(hidden[:, -1]).argmax(-1)
        return torch.stack(out, dim=1)


def _load_all(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors
