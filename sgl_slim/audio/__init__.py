"""Samp: audio-token merging and diversity pruning (plain torch; never imports sglang)."""

from sgl_slim.audio.encoder_attention import encoder_attention_stats, layer_attention_probs, pool_stats
from sgl_slim.audio.samp import SampAttention, attention_stats, samp_compress, samp_compress_ref

__all__ = ["SampAttention", "attention_stats", "encoder_attention_stats", "layer_attention_probs", "pool_stats",
           "samp_compress", "samp_compress_ref"]
