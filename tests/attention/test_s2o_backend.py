"""The S2O attention backend's SGLang glue, without a server: launch-group metadata, the backend's forward
against SGLang's own torch_native backend, the checks that refuse unsupported layers, the flag mapping."""

from __future__ import annotations

import argparse
import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

from sgl_slim.config import ConfigError, EagleConfig, S2OConfig, SlimConfig
from sgl_slim.integration import s2o_backend as sb


# ---------------------------------------------------------------- metadata (pure torch, no sglang import)

def _pool(max_reqs=6, max_ctx=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # distinct slots everywhere, scattered, so a wrong (row, position) pick cannot go unnoticed
    return torch.randperm(max_reqs * max_ctx, generator=g).view(max_reqs, max_ctx).to(torch.int32)


def test_groups_gather_each_sequences_slots_in_position_order():
    r2t = _pool()
    rows = torch.tensor([4, 1, 3])
    seq_lens, ext = [40, 7, 23], [9, 7, 1]        # prefix hit, fresh prompt, decode-like row of a MIXED batch
    (g,) = sb.build_launch_groups(r2t, rows, seq_lens, ext, tau=0.1, min_length=0)
    assert g.sparse and g.tau == 0.1 and g.seq_ids == (0, 1, 2) and g.q_rows is None
    assert g.qo_indptr.tolist() == [0, 9, 16, 17]
    assert g.kv_indptr.tolist() == [0, 40, 47, 70]
    expect = torch.cat([r2t[4, :40], r2t[1, :7], r2t[3, :23]])
    assert torch.equal(g.kv_indices, expect)


def test_short_sequences_go_to_a_dense_group_with_their_own_rows():
    r2t = _pool(seed=1)
    rows = torch.tensor([0, 5, 2, 1])
    seq_lens, ext = [50, 10, 33, 12], [5, 10, 3, 2]
    groups = sb.build_launch_groups(r2t, rows, seq_lens, ext, tau=0.2, min_length=30)
    sparse, dense = groups
    assert sparse.sparse and sparse.tau == 0.2 and sparse.seq_ids == (0, 2)
    assert not dense.sparse and dense.tau == 0.0 and dense.seq_ids == (1, 3)
    # q rows: seq 0 -> 0..4, seq 1 -> 5..14, seq 2 -> 15..17, seq 3 -> 18..19
    assert sparse.q_rows.tolist() == [0, 1, 2, 3, 4, 15, 16, 17]
    assert dense.q_rows.tolist() == list(range(5, 15)) + [18, 19]
    assert sparse.qo_indptr.tolist() == [0, 5, 8] and dense.qo_indptr.tolist() == [0, 10, 12]
    assert torch.equal(sparse.kv_indices, torch.cat([r2t[0, :50], r2t[2, :33]]))
    assert torch.equal(dense.kv_indices, torch.cat([r2t[5, :10], r2t[1, :12]]))
    # every q row is served exactly once
    assert sorted(sparse.q_rows.tolist() + dense.q_rows.tolist()) == list(range(sum(ext)))


def test_all_short_batch_is_one_dense_group_without_row_gather():
    (g,) = sb.build_launch_groups(_pool(), torch.tensor([2, 3]), [8, 9], [8, 2], tau=0.5, min_length=4096)
    assert not g.sparse and g.tau == 0.0 and g.q_rows is None


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="sequence 1: 5 new tokens but kv length 3"):
        sb.build_launch_groups(_pool(), torch.tensor([0, 1]), [8, 3], [2, 5], tau=0.0, min_length=0)
    with pytest.raises(ValueError, match="batch of 2 requests"):
        sb.build_launch_groups(_pool(), torch.tensor([0, 1]), [8], [2], tau=0.0, min_length=0)


def test_stats_weight_density_by_causal_pairs_and_count_dense_chunks():
    st = sb.S2OStats()
    st.record("a", kv_len=10, q_len=10, density=0.5, sparse=True)    # 55 pairs
    st.record("b", kv_len=20, q_len=1, density=1.0, sparse=True)     # 20 pairs
    st.record("c", kv_len=5, q_len=5, density=1.0, sparse=False)
    assert st.sparse_chunks == 2 and st.dense_chunks == 1
    assert st.density == pytest.approx((0.5 * 55 + 20) / 75)
    assert st.snapshot()["recent"][-1] == ("c", 5, 5, 1.0, False)


# ---------------------------------------------------------------- the flag mapping (launcher side)

def _args(**kw):
    base = dict(prefill_attention_backend=None, decode_attention_backend=None, attention_backend=None,
                speculative_algorithm=None, speculative_attention_mode="prefill", dllm_algorithm=None,
                cuda_graph_backend_prefill=None, disable_prefill_cuda_graph=False)
    base.update(kw)
    return argparse.Namespace(**base)


ON = SlimConfig(s2o=S2OConfig(enabled=True))


def test_adjust_server_args_cpu_uses_torch_native_for_decode():
    a = _args()
    sb.adjust_server_args(ON, a, cpu=True)
    assert a.prefill_attention_backend == "s2o" and a.decode_attention_backend == "torch_native"
    assert not a.disable_prefill_cuda_graph


def test_adjust_server_args_gpu_keeps_the_users_decode_backend_and_disables_prefill_graphs():
    a = _args()
    sb.adjust_server_args(ON, a, cpu=False)
    assert a.prefill_attention_backend == "s2o" and a.decode_attention_backend is None  # SGLang's default
    assert a.disable_prefill_cuda_graph
    b = _args(attention_backend="fa3")
    sb.adjust_server_args(ON, b, cpu=False)
    assert b.attention_backend == "fa3" and b.prefill_attention_backend == "s2o"


@pytest.mark.parametrize("kw, flag", [
    (dict(prefill_attention_backend="triton"), "--prefill-attention-backend"),
    (dict(decode_attention_backend="s2o"), "--decode-attention-backend"),
    (dict(attention_backend="s2o"), "--attention-backend"),
    (dict(dllm_algorithm="LowConfidence"), "--dllm-algorithm"),
])
def test_adjust_server_args_conflicts_name_the_flag(kw, flag):
    with pytest.raises(ConfigError) as exc:
        sb.adjust_server_args(ON, _args(**kw), cpu=True)
    assert exc.value.flag == flag


def test_adjust_server_args_routes_speculative_verification_to_the_decode_backend():
    a = _args(speculative_algorithm="EAGLE3")
    sb.adjust_server_args(ON, a, cpu=True)
    assert a.speculative_attention_mode == "decode" and a.prefill_attention_backend == "s2o"
    b = _args()   # --eagle-draft: the eagle feature sets --speculative-algorithm after this runs
    sb.adjust_server_args(SlimConfig(s2o=S2OConfig(enabled=True), eagle=EagleConfig(draft="/x")), b, cpu=True)
    assert b.speculative_attention_mode == "decode"


def test_adjust_server_args_refuses_a_prefill_cuda_graph_on_gpu():
    with pytest.raises(ConfigError, match="--cuda-graph-backend-prefill"):
        sb.adjust_server_args(ON, _args(cuda_graph_backend_prefill="breakable"), cpu=False)


def test_adjust_server_args_is_a_no_op_when_s2o_is_off():
    a = _args()
    sb.adjust_server_args(SlimConfig(), a, cpu=True)
    assert a == _args()


# ---------------------------------------------------------------- with SGLang imported (slower)

@pytest.fixture(scope="module")
def backend_cls():
    pytest.importorskip("sglang")
    return sb._make_backend_class()


def test_install_is_idempotent_and_registers_the_name():
    pytest.importorskip("sglang")
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    cfg = SlimConfig(s2o=S2OConfig(enabled=True, tau=0.25))
    sb.install(cfg)
    sb.install(cfg)
    assert ATTENTION_BACKEND_CHOICES.count("s2o") == 1
    assert ATTENTION_BACKENDS["s2o"] is sb._create_s2o_backend
    assert sb._state["config"].tau == 0.25


def test_hooked_symbols_exist_in_the_pinned_sglang():
    pytest.importorskip("sglang")
    for path in sb.HOOKED_SYMBOLS:
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{path} is gone from this SGLang"


class _Pool:
    """Token-slot KV pool with SGLang's MHA interface (one layer)."""

    def __init__(self, slots, hkv, d, dtype):
        self.k = torch.zeros(slots, hkv, d, dtype=dtype)
        self.v = torch.zeros(slots, hkv, d, dtype=dtype)
        self.layer_num = 1

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v

    def set_kv_buffer(self, layer, loc, k, v):
        self.k[loc.loc] = k
        self.v[loc.loc] = v


def _layer(hq=4, hkv=2, d=16, **kw):
    from sglang.srt.layers.radix_attention import AttentionType
    base = dict(layer_id=0, tp_q_head_num=hq, tp_k_head_num=hkv, qk_head_dim=d, v_head_dim=d, scaling=d ** -0.5,
                is_cross_attention=False, attn_type=AttentionType.DECODER, sliding_window_size=-1,
                use_irope=False, logit_cap=0.0, k_scale=None, v_scale=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _batch_and_backend(backend_cls, monkeypatch, cfg, seq_lens, ext, hq=4, hkv=2, d=16, seed=0):
    """A batch whose prefixes are already in the pool (radix hits / earlier chunks) plus new tokens."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    monkeypatch.setattr(sb, "check_runner", lambda runner: None)
    g = torch.Generator().manual_seed(seed)
    slots = 512
    pool = _Pool(slots, hkv, d, torch.float32)
    pool.k.copy_(torch.randn(slots, hkv, d, generator=g))
    pool.v.copy_(torch.randn(slots, hkv, d, generator=g))
    r2t = torch.randperm(slots, generator=g)[: 4 * 100].view(4, 100).to(torch.int32)
    rows = torch.tensor([2, 0, 3][: len(seq_lens)])
    out_loc = torch.cat([r2t[r, s - n:s] for r, s, n in zip(rows.tolist(), seq_lens, ext)]).long()
    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=r2t),
                             token_to_kv_pool=pool, model_config=SimpleNamespace(num_hidden_layers=1))
    backend = backend_cls(runner, cfg)
    fb = SimpleNamespace(
        forward_mode=ForwardMode.EXTEND, req_pool_indices=rows, seq_lens=torch.tensor(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens), extend_seq_lens=torch.tensor(ext), extend_seq_lens_cpu=ext,
        extend_prefix_lens=torch.tensor([s - n for s, n in zip(seq_lens, ext)]), out_cache_loc=out_loc,
        encoder_lens=None, rids=[f"r{i}" for i in range(len(seq_lens))])
    T = sum(ext)
    q = torch.randn(T, hq * d, generator=g)
    k = torch.randn(T, hkv, d, generator=g)
    v = torch.randn(T, hkv, d, generator=g)
    return backend, fb, pool, r2t, q, k, v


def _torch_native(pool, r2t, fb, layer, q):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    out = torch.empty(q.shape[0], layer.tp_q_head_num, layer.v_head_dim)
    TorchNativeAttnBackend._run_sdpa_forward_extend(
        None, q.view(-1, layer.tp_q_head_num, layer.qk_head_dim), out, pool.k, pool.v, r2t, fb.req_pool_indices,
        fb.seq_lens, fb.extend_prefix_lens, fb.extend_seq_lens, scaling=layer.scaling, enable_gqa=True, causal=True)
    return out.view(q.shape[0], -1)


def test_tau0_equals_sglang_torch_native_on_a_mixed_batch(backend_cls, monkeypatch, caplog):
    # prefix hit (70 cached + 20 new), fresh prompt (37), one-token extension; min_length splits the batch
    cfg = S2OConfig(enabled=True, tau=0.0, block_size=16, segment_size=32, min_length=40)
    backend, fb, pool, r2t, q, k, v = _batch_and_backend(backend_cls, monkeypatch, cfg, [90, 37, 61], [20, 37, 1])
    layer = _layer()
    backend.init_forward_metadata(fb)
    assert [g.seq_ids for g in backend.forward_metadata.groups] == [(0, 2), (1,)]
    with caplog.at_level(logging.INFO, logger="sgl_slim.s2o"):
        out = backend.forward_extend(q, k, v, layer, fb)
    assert torch.equal(pool.k[fb.out_cache_loc], k), "new K must be written to the pool before attention"
    ref = _torch_native(pool, r2t, fb, layer, q)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    lines = [r.getMessage() for r in caplog.records if "S2O prefill" in r.getMessage()]
    assert len(lines) == 3 and "rid=r1" in lines[1] and "dense (kv_len < --s2o-min-length 40)" in lines[1]
    assert all("density=1.0000" in line for line in lines)


def test_tau_positive_is_sparse_close_and_logged(backend_cls, monkeypatch, caplog):
    cfg = S2OConfig(enabled=True, tau=1.0, block_size=16, segment_size=32, min_length=0)
    backend, fb, pool, r2t, q, k, v = _batch_and_backend(backend_cls, monkeypatch, cfg, [96, 80], [64, 80])
    before = sb.STATS.sparse_chunks
    with caplog.at_level(logging.INFO, logger="sgl_slim.s2o"):
        out = backend.forward_extend(q, k, v, _layer(), fb)     # metadata built lazily
    ref = _torch_native(pool, r2t, fb, _layer(), q)
    assert sb.STATS.sparse_chunks == before + 2
    dens = [rec[3] for rec in list(sb.STATS.recent)[-2:]]
    assert all(0 < x < 1 for x in dens), f"tau=1 on random keys should skip blocks, got densities {dens}"
    assert not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.5
    assert any("tau=1" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kw, match", [
    (dict(sliding_window_size=128), "sliding window"),
    (dict(is_cross_attention=True), "cross-attention"),
    (dict(logit_cap=30.0), "caps attention logits"),
    (dict(v_head_dim=8), "v head dim"),
])
def test_unsupported_layers_fail_at_first_use_naming_the_flag(backend_cls, monkeypatch, kw, match):
    cfg = S2OConfig(enabled=True, tau=0.0, block_size=16, segment_size=32, min_length=0)
    backend, fb, *_ , q, k, v = _batch_and_backend(backend_cls, monkeypatch, cfg, [20], [20])
    with pytest.raises(ConfigError, match=match) as exc:
        backend.forward_extend(q, k, v, _layer(**kw), fb)
    assert exc.value.flag == "--s2o"


def test_encoder_only_layers_and_target_verify_are_refused(backend_cls, monkeypatch):
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    cfg = S2OConfig(enabled=True, tau=0.0, block_size=16, segment_size=32, min_length=0)
    backend, fb, *_ , q, k, v = _batch_and_backend(backend_cls, monkeypatch, cfg, [20], [20])
    with pytest.raises(ConfigError, match="encoder_only"):
        backend.forward_extend(q, k, v, _layer(attn_type=AttentionType.ENCODER_ONLY), fb)
    fb.forward_mode = ForwardMode.TARGET_VERIFY
    with pytest.raises(ConfigError) as exc:
        backend.forward_extend(q, k, v, _layer(), fb)
    assert exc.value.flag == "--speculative-attention-mode"
    with pytest.raises(ConfigError, match="sinks"):
        backend.forward_extend(q, k, v, _layer(), fb, sinks=torch.zeros(4))


def test_startup_checks_refuse_gpu_head_dims_and_dtypes():
    pytest.importorskip("sglang")

    def runner(**kw):
        mc = dict(is_encoder_decoder=False, is_generation=True, is_hybrid_swa=False, attention_chunk_size=None,
                  dtype=torch.bfloat16, head_dim=128, num_hidden_layers=2)
        mc.update(kw)
        return SimpleNamespace(model_config=SimpleNamespace(**mc), device="cuda", use_mla_backend=False,
                               kv_cache_dtype=mc["dtype"], decode_attention_backend_str="fa3")
    with pytest.raises(ConfigError, match="head dims") as exc:
        sb.check_runner(runner(head_dim=96))
    assert exc.value.flag == "--s2o"
    with pytest.raises(ConfigError) as exc:
        sb.check_runner(runner(dtype=torch.float32))
    assert exc.value.flag == "--dtype"
    with pytest.raises(ConfigError, match="sliding-window"):
        sb.check_runner(runner(is_hybrid_swa=True))
    with pytest.raises(ConfigError, match="encoder-only"):
        sb.check_runner(runner(is_generation=False))
