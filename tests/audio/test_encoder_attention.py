"""Last-encoder-layer attention recomputed from Q/K vs transformers' own eager attention weights."""

import pytest
import torch

from sgl_slim.audio import attention_stats, encoder_attention_stats, layer_attention_probs, pool_stats

transformers = pytest.importorskip("transformers")
from transformers import Qwen2AudioEncoderConfig  # noqa: E402
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    cfg = Qwen2AudioEncoderConfig(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                                  d_model=32, max_source_positions=40)
    cfg._attn_implementation = "eager"
    return Qwen2AudioEncoder(cfg).eval()


def test_probs_match_transformers_eager_attention(encoder):
    layer = encoder.layers[-1]
    h = torch.randn(2, 40, 32)
    with torch.no_grad():
        _, weights = layer.self_attn(hidden_states=layer.self_attn_layer_norm(h), attention_mask=None)
        ours = layer_attention_probs(layer, h)
    assert ours.shape == weights.shape == (2, 4, 40, 40)
    # same math, different op order (scale before vs after the product): float32 rounding only
    torch.testing.assert_close(ours, weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer_attention_probs(layer, h[1]), ours[1])


@pytest.mark.parametrize("valid,n_tokens", [(40, 20), (31, 15), (9, 4), (2, 1)])
def test_chunked_stats_match_full_probs(encoder, valid, n_tokens):
    layer = encoder.layers[-1]
    h = torch.randn(1, 40, 32)
    got = encoder_attention_stats(layer, h, valid_frames=[valid], n_tokens=[n_tokens], head_chunk=3)[0]
    probs = layer_attention_probs(layer, h)[0][:, :valid, :valid]          # softmax over all 40, keep valid
    want = pool_stats(attention_stats(probs), pool=2, n_tokens=n_tokens)
    torch.testing.assert_close(got.merge_weight, want.merge_weight)
    torch.testing.assert_close(got.relevance, want.relevance)
    assert got.merge_weight.shape == (n_tokens,)


def test_bad_arguments(encoder):
    layer = encoder.layers[-1]
    with pytest.raises(ValueError, match="valid_frames=0"):
        encoder_attention_stats(layer, torch.randn(1, 40, 32), valid_frames=[0], n_tokens=[1])
    with pytest.raises(ValueError, match="cannot pool"):
        encoder_attention_stats(layer, torch.randn(1, 40, 32), valid_frames=[5], n_tokens=[3])
    with pytest.raises(ValueError, match="one valid_frames"):
        encoder_attention_stats(layer, torch.randn(2, 40, 32), valid_frames=[5], n_tokens=[2])
    headless = torch.nn.Module()
    headless.self_attn, headless.self_attn_layer_norm = torch.nn.Linear(2, 2), torch.nn.Identity()
    with pytest.raises(ValueError, match="num_heads"):
        layer_attention_probs(headless, torch.randn(4, 2))
