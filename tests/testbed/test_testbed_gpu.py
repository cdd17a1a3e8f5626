"""The testbed on CUDA: the replaced attention (Triton S2O / baseline kernel) against torch SDPA in a real model."""
import pytest
import torch

from sgl_slim.testbed.attn import parse_method, use_method

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def gpu_model(tokenizer):
    from sgl_slim.testbed.model import ModelSpec, build_model
    spec = ModelSpec(hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=128, intermediate_size=512)
    return build_model(spec, tokenizer, seed=0).to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("method", ["s2o:v1:0", "s2o:v2:0", "topcdf:1.0"])
def test_dense_settings_match_sdpa_on_the_gpu(gpu_model, stream, method):
    ids = stream[:4096][None].cuda()
    with torch.no_grad():
        ref = gpu_model(input_ids=ids).logits.float()
        with use_method(gpu_model, parse_method(method, block_size=64, segment_size=512)) as run:
            out = gpu_model(input_ids=ids).logits.float()
    # bf16 attention reordered: the logits differ by bf16 rounding of activations, not more
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert run.density == pytest.approx(1.0) and run.attn_ms > 0


def test_a_large_tau_skips_work_and_is_timed(gpu_model, stream):
    ids = stream[:8192][None].cuda()
    with torch.no_grad(), use_method(gpu_model, parse_method("s2o:v1:0.1", block_size=64, segment_size=512)) as run:
        gpu_model(input_ids=ids)
    assert run.density < 1.0 and run.calls == 2 and run.attn_ms > 0
