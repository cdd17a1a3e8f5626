import pytest
import torch

from sgl_slim.testbed.attn import parse_method, use_method


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids(stream):
    return stream[:512][None]


def test_dense_replacement_equals_transformers_sdpa(tiny_model, ids):
    ref = _logits(tiny_model, ids)
    with use_method(tiny_model, parse_method("dense")) as run:
        out = _logits(tiny_model, ids)
    assert torch.allclose(out, ref, atol=1e-5)
    assert run.calls == tiny_model.config.num_hidden_layers and run.density == 1.0
    assert tiny_model.config._attn_implementation == "sdpa"   # restored


def test_s2o_at_tau_zero_is_dense_and_a_large_tau_skips_work(tiny_model, ids):
    ref = _logits(tiny_model, ids)
    with use_method(tiny_model, parse_method("s2o:v2:0", block_size=32, segment_size=64)) as run0:
        out0 = _logits(tiny_model, ids)
    assert torch.allclose(out0, ref, atol=1e-4)
    assert run0.density == 1.0
    with use_method(tiny_model, parse_method("s2o:v1:0.5", block_size=32, segment_size=64)) as run:
        _logits(tiny_model, ids)
    assert run.density < 0.9 and run.attn_ms > 0


def test_s2o_counts_are_read_once_and_equal_the_per_call_densities(tiny_model, ids, monkeypatch):
    """Inside a Run, S2O leaves its block counts on the device and the Run reads them all at once; the density
    that gives equals the mean of the per-call densities (host-read stats) of the same calls (equal lengths:
    equal work)."""
    from sgl_slim.testbed import attn
    per_call, real_attend = [], attn.attend

    def both(method, q, k, v, *, layer, scale, run=None):
        per_call.append(real_attend(method, q, k, v, layer=layer, scale=scale)[1])
        return real_attend(method, q, k, v, layer=layer, scale=scale, run=run)

    monkeypatch.setattr(attn, "attend", both)
    with use_method(tiny_model, parse_method("s2o:v1:0.5", block_size=32, segment_size=64)) as run:
        _logits(tiny_model, ids)
    assert len(run._pending) == tiny_model.config.num_hidden_layers, "counts must wait until read"
    served = run.density
    assert not run._pending
    assert served == pytest.approx(sum(per_call) / len(per_call), rel=1e-12) and served < 0.9


def test_baseline_runs_on_the_kernel_path(tiny_model, ids):
    ids = ids[:, :256]
    ref = _logits(tiny_model, ids)
    with use_method(tiny_model, parse_method("topcdf:1.0", block_size=32, segment_size=64)) as run:
        out = _logits(tiny_model, ids)
    assert torch.allclose(out, ref, atol=1e-4)     # gamma 1 keeps every block
    with use_method(tiny_model, parse_method("topcdf:0.3", block_size=32, segment_size=64)) as run:
        _logits(tiny_model, ids)
    assert run.density < 0.8


def test_capture_keeps_post_rope_qkv(tiny_model, ids):
    with use_method(tiny_model, parse_method("capture")) as run:
        _logits(tiny_model, ids)
    cfg = tiny_model.config
    assert sorted(run.captured) == list(range(cfg.num_hidden_layers))
    q, k, v = run.captured[0]
    assert q.shape == (512, cfg.num_attention_heads, cfg.head_dim)
    assert k.shape == v.shape == (512, cfg.num_key_value_heads, cfg.head_dim)


def test_bad_methods_are_named():
    with pytest.raises(ValueError, match="s2o:VARIANT:TAU with VARIANT one of"):
        parse_method("s2o:v9:1e-3")
    assert parse_method("s2o:v3:1e-3").variant == "v3"
    with pytest.raises(ValueError, match="no baseline 'nosuch'"):
        parse_method("nosuch:0.9")
