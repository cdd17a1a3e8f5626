"""Recompute the last encoder layer's attention statistics for Samp.

Serving encoders (SGLang's among them) do not return attention maps. Samp needs only one layer's: given the
INPUT of a Whisper-style encoder layer (``self_attn_layer_norm`` then ``self_attn`` with ``q_proj``/``k_proj``,
as in transformers' Qwen2AudioEncoderLayer / WhisperEncoderLayer), recompute its attention probabilities from
its own Q and K. Whisper-style encoders attend over frames at twice the token rate (an ``AvgPool1d(2, 2)``
follows the last layer), so the per-frame statistics are average-pooled to tokens the same way.

Conventions (documented choices):
- Probabilities are the softmax over ALL frames the encoder saw (SGLang runs the Qwen2-Audio encoder without a
  padding mask, so padded frames do take attention mass); statistics then use only the clip's valid frames
  (rows = queries and columns = keys ``< valid_frames``).
- merge_weight[frame] = mean over valid queries of max over heads; relevance[frame] = mean over heads of the
  diagonal. Token t gets the mean of frames ``pool*t .. pool*t + pool - 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sgl_slim.audio.samp import SampAttention


def _heads(attn: nn.Module) -> tuple[int, int]:
    for name in ("num_heads", "num_attention_heads", "heads"):
        if isinstance(getattr(attn, name, None), int):
            heads = getattr(attn, name)
            break
    else:
        raise ValueError(f"{type(attn).__name__}: cannot find the number of heads (num_heads)")
    q_out = attn.q_proj.weight.shape[0] if hasattr(attn, "q_proj") else None
    if q_out is None or q_out % heads:
        raise ValueError(f"{type(attn).__name__}: needs q_proj/k_proj linear layers with width divisible by heads")
    return heads, q_out // heads


def layer_attention_probs(layer: nn.Module, layer_input: Tensor) -> Tensor:
    """Attention probabilities of a Whisper-style encoder layer, recomputed from its own Q/K.

    layer: module with ``self_attn_layer_norm`` and ``self_attn`` (``q_proj``, ``k_proj``, ``num_heads``).
    layer_input: [B, T, d] (or [T, d]) hidden states entering the layer.
    Returns [B, H, T, T] (or [H, T, T]) float32 probabilities, rows = queries. No mask (as SGLang runs it).
    """
    squeeze = layer_input.dim() == 2
    h = layer_input[None] if squeeze else layer_input
    attn = layer.self_attn
    heads, head_dim = _heads(attn)
    h = layer.self_attn_layer_norm(h)
    b, t, _ = h.shape
    q = attn.q_proj(h).float().view(b, t, heads, head_dim).transpose(1, 2)    # [B, H, T, hd]
    k = attn.k_proj(h).float().view(b, t, heads, head_dim).transpose(1, 2)
    probs = torch.softmax((q @ k.transpose(-1, -2)) * head_dim ** -0.5, dim=-1)   # [B, H, T, T]
    return probs[0] if squeeze else probs


def pool_stats(stats: SampAttention, *, pool: int, n_tokens: int) -> SampAttention:
    """Average per-frame statistics over groups of ``pool`` frames: frames [T] -> tokens [n_tokens]."""
    need = pool * n_tokens
    if stats.merge_weight.numel() < need:
        raise ValueError(f"{stats.merge_weight.numel()} frames cannot pool into {n_tokens} tokens of {pool}")
    def _p(v: Tensor) -> Tensor:
        return v[:need].view(n_tokens, pool).mean(dim=1)
    return SampAttention(merge_weight=_p(stats.merge_weight), relevance=_p(stats.relevance))


@torch.no_grad()
def encoder_attention_stats(layer: nn.Module, layer_input: Tensor, *, valid_frames: list[int],
                            n_tokens: list[int], pool: int = 2, head_chunk: int = 4) -> list[SampAttention]:
    """Per-clip Samp statistics from the last encoder layer, without materialising [H, T, T] for all heads.

    layer_input: [B, T, d] input of the last encoder layer; valid_frames[b]: clip b's real frames;
    n_tokens[b]: clip b's audio tokens after pooling. Returns B :class:`SampAttention` at token resolution.
    """
    if layer_input.dim() != 3 or len(valid_frames) != layer_input.shape[0] or len(n_tokens) != len(valid_frames):
        raise ValueError(f"layer_input [B, T, d] with one valid_frames/n_tokens per clip expected, got "
                         f"{tuple(layer_input.shape)}, {len(valid_frames)}, {len(n_tokens)}")
    attn = layer.self_attn
    heads, head_dim = _heads(attn)
    h = layer.self_attn_layer_norm(layer_input)
    bsz, t, _ = h.shape
    tq = min(t, max(int(v) for v in valid_frames))                          # queries beyond every clip: unused
    q = attn.q_proj(h[:, :tq]).float().view(bsz, tq, heads, head_dim).transpose(1, 2) * head_dim ** -0.5
    k = attn.k_proj(h).float().view(bsz, t, heads, head_dim).transpose(1, 2)  # [B, H, T, hd]
    out = []
    for b in range(bsz):
        tv = int(valid_frames[b])
        if not (1 <= tv <= t):
            raise ValueError(f"clip {b}: valid_frames={tv} outside [1, {t}]")
        head_max = None
        diag_sum = torch.zeros(tv, device=q.device)
        for h0 in range(0, heads, head_chunk):
            # softmax over all T keys (what the encoder computed), then keep valid queries / keys
            p = torch.softmax(q[b, h0:h0 + head_chunk, :tv] @ k[b, h0:h0 + head_chunk].transpose(-1, -2), -1)
            p = p[..., :tv]                                                       # [h, Tv, Tv]
            chunk_max = p.amax(dim=0)
            head_max = chunk_max if head_max is None else torch.maximum(head_max, chunk_max)
            diag_sum += p.diagonal(dim1=-2, dim2=-1).sum(dim=0)
        frame_stats = SampAttention(merge_weight=head_max.mean(dim=0), relevance=diag_sum / heads)
        out.append(pool_stats(frame_stats, pool=pool, n_tokens=int(n_tokens[b])))
    return out
