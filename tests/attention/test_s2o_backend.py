"""The S2O attention backend's SGLang glue, without a server: the per-batch plan (routing and launch groups),
the backend's forward against SGLang's own torch_native backend (bit-identical where it delegates to it),
calibrated taus, the checks that refuse unsupported layers and modes, the flag mapping."""

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
    (g,) = sb.build_launch_groups(r2t, rows, seq_lens, ext, min_length=0)
    assert g.sparse and g.seq_ids == (0, 1, 2) and g.q_rows is None
    assert g.qo_indptr.tolist() == list(g.qo_indptr_host) == [0, 9, 16, 17]
    assert g.kv_indptr.tolist() == list(g.kv_indptr_host) == [0, 40, 47, 70]
    expect = torch.cat([r2t[4, :40], r2t[1, :7], r2t[3, :23]])
    assert torch.equal(g.kv_indices, expect)


def test_short_sequences_go_to_a_dense_group_with_their_own_rows():
    r2t = _pool(seed=1)
    rows = torch.tensor([0, 5, 2, 1])
    seq_lens, ext = [50, 10, 33, 12], [5, 10, 3, 2]
    groups = sb.build_launch_groups(r2t, rows, seq_lens, ext, min_length=30)
    sparse, dense = groups
    assert sparse.sparse and sparse.seq_ids == (0, 2)
    assert not dense.sparse and dense.seq_ids == (1, 3)
    # q rows: seq 0 -> 0..4, seq 1 -> 5..14, seq 2 -> 15..17, seq 3 -> 18..19
    assert sparse.q_rows.tolist() == [0, 1, 2, 3, 4, 15, 16, 17]
    assert dense.q_rows.tolist() == list(range(5, 15)) + [18, 19]
    assert sparse.qo_indptr.tolist() == [0, 5, 8] and dense.qo_indptr.tolist() == [0, 10, 12]
    assert torch.equal(sparse.kv_indices, torch.cat([r2t[0, :50], r2t[2, :33]]))
    assert torch.equal(dense.kv_indices, torch.cat([r2t[5, :10], r2t[1, :12]]))
    # every q row is served exactly once
    assert sorted(sparse.q_rows.tolist() + dense.q_rows.tolist()) == list(range(sum(ext)))


def test_all_short_batch_is_one_dense_group_without_row_gather():
    (g,) = sb.build_launch_groups(_pool(), torch.tensor([2, 3]), [8, 9], [8, 2], min_length=4096)
    assert not g.sparse and g.q_rows is None


def test_bad_lengths_are_refused():
    taus = sb.LayerTaus(default=0.1)
    with pytest.raises(ValueError, match="sequence 1: 5 new tokens but kv length 3"):
        sb.plan_batch(_pool(), torch.tensor([0, 1]), [8, 3], [2, 5], taus=taus, min_length=0)
    with pytest.raises(ValueError, match="batch of 2 requests"):
        sb.build_launch_groups(_pool(), torch.tensor([0, 1]), [8], [2], min_length=0)


@pytest.mark.parametrize("tau, min_length, seq_lens, route, reasons", [
    (0.0, 0, [40, 7], sb.Route.STOCK, ["TAU_ZERO", "TAU_ZERO"]),          # tau 0: dense everywhere -> stock
    (0.1, 50, [40, 7], sb.Route.STOCK, ["SHORT", "SHORT"]),               # all below --s2o-min-length
    (0.1, 30, [40, 7], sb.Route.S2O, ["NONE", "SHORT"]),                  # mixed: whole batch through S2O
    (0.1, 0, [40, 7], sb.Route.S2O, ["NONE", "NONE"]),
])
def test_plan_routes_dense_batches_to_the_stock_backend(tau, min_length, seq_lens, route, reasons):
    plan = sb.plan_batch(_pool(), torch.tensor([1, 2]), seq_lens, [5, 7], taus=sb.LayerTaus(default=tau),
                         min_length=min_length, rids=("a", "b"))
    assert plan.route is route and [r.name for r in plan.reasons] == reasons
    assert plan.sparse == tuple(r == "NONE" for r in reasons) and plan.rids == ("a", "b")
    assert (plan.groups == ()) == (route is sb.Route.STOCK)
    if route is sb.Route.S2O:
        assert sorted(b for g in plan.groups for b in g.seq_ids) == [0, 1]


def _calibration(taus, **kw):
    from sgl_slim.attention.calibration import S2OCalibration
    base = dict(model="fake", num_layers=len(taus), num_kv_heads=len(taus[0]), head_dim=16, error_budget=0.05,
                block_size=16, segment_size=32, variant="v1", taus=taus)
    base.update(kw)
    return S2OCalibration(**base)


def test_layer_taus_from_the_flag_or_a_calibration_per_kv_head():
    cfg = S2OConfig(enabled=True, tau=0.7)
    plain = sb.LayerTaus.from_config(cfg)
    assert plain.tau(0) == plain.tau(31) == 0.7 and not plain.all_dense and not plain.any_dense_layer
    assert not plain.dense(3) and plain.describe() == "tau=0.7" and plain.variant == cfg.variant == "v4"
    cal = sb.LayerTaus.from_config(cfg, _calibration(((0.3, 0.1), (0.0, 0.0), (0.5, 0.5))))
    assert [cal.tau(i) for i in range(3)] == [(0.3, 0.1), 0.0, 0.5]   # one float when the heads agree
    assert [cal.dense(i) for i in range(3)] == [False, True, False] and cal.variant == "v1"
    assert cal.any_dense_layer and not cal.all_dense and cal.describe() == "tau=calibrated (0..0.5)"
    zero = sb.LayerTaus.from_config(cfg, _calibration(((0.0, 0.0), (0.0, 0.0))))
    assert zero.all_dense
    plan = sb.plan_batch(_pool(), torch.tensor([1]), [60], [60], taus=zero, min_length=0)
    assert plan.route is sb.Route.STOCK and plan.reasons == (sb.DenseReason.TAU_ZERO,)


def test_layer_taus_per_head_keep_this_ranks_heads():
    cal = _calibration(((0.1, 0.2, 0.3, 0.4), (0.0, 0.0, 0.5, 0.5), (0.0, 0.0, 0.0, 0.0)))
    cfg = S2OConfig(enabled=True)
    rank1 = sb.LayerTaus.from_config(cfg, cal, kv_heads=(2, 3))
    assert rank1.tau(0) == (0.3, 0.4) and rank1.tau(1) == 0.5          # one float when the heads agree
    assert [rank1.dense(i) for i in range(3)] == [False, False, True]
    rank0 = sb.LayerTaus.from_config(cfg, cal, kv_heads=(0, 1))
    assert rank0.tau(0) == (0.1, 0.2) and rank0.dense(1) and rank0.dense(2)


@pytest.mark.parametrize("total, size, expect", [
    (8, 1, [tuple(range(8))]),
    (8, 4, [(0, 1), (2, 3), (4, 5), (6, 7)]),
    (2, 4, [(0,), (0,), (1,), (1,)]),          # fewer heads than ranks: each head on 2 consecutive ranks
    (1, 2, [(0,), (0,)]),
])
def test_local_kv_heads_follow_sglangs_sharding(total, size, expect):
    assert [sb.local_kv_heads(total, r, size) for r in range(size)] == expect


def test_run_s2o_layer_passes_per_head_taus_and_the_variant():
    g = torch.Generator().manual_seed(3)
    k_pool, v_pool = torch.randn(256, 2, 16, generator=g), torch.randn(256, 2, 16, generator=g)
    r2t = torch.randperm(256, generator=g)[:200].view(2, 100).to(torch.int32)
    plan = sb.plan_batch(r2t, torch.tensor([1, 0]), [96, 20], [64, 20], taus=sb.LayerTaus(default=0.5), min_length=40)
    q = torch.randn(84, 4, 16, generator=g)
    kw = dict(block_size=16, segment_size=32, sm_scale=0.25, variant="v1")
    same, dens_same = sb.run_s2o_layer(plan, q, k_pool, v_pool, tau=torch.tensor([1.0, 1.0]), **kw)
    flat, dens_flat = sb.run_s2o_layer(plan, q, k_pool, v_pool, tau=1.0, **kw)
    assert torch.equal(same, flat) and torch.equal(dens_same, dens_flat) and dens_flat[1] == 1.0 and dens_flat[0] < 1.0
    dense_head1, _ = sb.run_s2o_layer(plan, q, k_pool, v_pool, tau=torch.tensor([1.0, 0.0]), **kw)
    # query heads 2, 3 read KV head 1 (GQA 4:2): tau 0 there is dense, so those heads change, heads 0, 1 do not
    assert torch.equal(dense_head1[:, :2], flat[:, :2]) and not torch.equal(dense_head1[:64, 2:], flat[:64, 2:])
    # the audit settings reach the attention API too (it refuses an unknown form, naming it)
    with pytest.raises(ValueError, match="audit_form must be one of"):
        sb.run_s2o_layer(plan, q, k_pool, v_pool, tau=1.0, audit_form="sideways", **kw)


def test_a_request_tau_beyond_fp32_runs_as_the_largest_fp32_tau():
    """A request may send any finite s2o_tau (1e300 passes its checks); the attention API takes fp32, where it
    would be inf and refused, and the scheduler died on the error. It runs as fp32's largest tau instead."""
    g = torch.Generator().manual_seed(5)
    k_pool, v_pool = torch.randn(256, 2, 16, generator=g), torch.randn(256, 2, 16, generator=g)
    r2t = torch.randperm(256, generator=g)[:200].view(2, 100).to(torch.int32)
    q = torch.randn(84, 4, 16, generator=g)
    kw = dict(block_size=16, segment_size=32, sm_scale=0.25, variant="v1")
    out = {}
    largest = float(torch.finfo(torch.float32).max)
    for own in (1e300, largest):
        plan = sb.plan_batch(r2t, torch.tensor([1, 0]), [96, 20], [64, 20], taus=sb.LayerTaus(default=0.5),
                             min_length=40, seq_taus=(own, None))
        out[own] = sb.run_s2o_layer(plan, q, k_pool, v_pool, tau=0.5, **kw)
    assert torch.equal(out[1e300][0], out[largest][0]) and torch.isfinite(out[1e300][0]).all()
    assert torch.equal(out[1e300][1], out[largest][1])
    assert sb.run_s2o_layer(plan, q, k_pool, v_pool, tau=1e300, **kw)[0].isfinite().all()    # --s2o-tau too


# ---------------------------------------------------------------- the flag mapping (launcher side)

def _args(**kw):
    base = dict(prefill_attention_backend=None, decode_attention_backend=None, attention_backend=None,
                speculative_algorithm=None, speculative_attention_mode="prefill", dllm_algorithm=None,
                cuda_graph_backend_prefill=None, disable_prefill_cuda_graph=False, disable_cuda_graph=False)
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
    assert a.disable_prefill_cuda_graph and not a.disable_cuda_graph, "decode CUDA graphs must stay on"
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


@pytest.mark.parametrize("kw, flag", [
    (dict(decode_backend="s2o", speculative=False, speculative_attention_mode=None, dllm_algorithm=None),
     "--decode-attention-backend"),
    (dict(decode_backend="fa3", speculative=True, speculative_attention_mode="prefill", dllm_algorithm=None),
     "--speculative-attention-mode"),
    (dict(decode_backend="fa3", speculative=False, speculative_attention_mode=None, dllm_algorithm="LowConf"),
     "--dllm-algorithm"),
])
def test_serving_mode_checks_name_the_flag(kw, flag):
    with pytest.raises(ConfigError) as exc:
        sb.check_serving_mode(**kw)
    assert exc.value.flag == flag
    sb.check_serving_mode(decode_backend="fa3", speculative=True, speculative_attention_mode="decode",
                          dllm_algorithm=None)


def _write_calibration(path, **kw):
    cal = _calibration(((1e-3, 2e-3), (0.0, 0.0)), **kw)
    cal.save(path)
    return str(path)


def test_calibration_flag_checks_the_file_and_the_block_sizes(tmp_path):
    good = _write_calibration(tmp_path / "c.json")
    cfg = S2OConfig(enabled=True, block_size=16, segment_size=32, calibration=good)
    cfg.validate()
    assert cfg.load_calibration().layer_tau(0) == (1e-3, 2e-3)
    with pytest.raises(ConfigError, match="pass --s2o-block-size 16 --s2o-segment-size 32") as exc:
        S2OConfig(enabled=True, block_size=32, segment_size=64, calibration=good).validate()
    assert exc.value.flag == "--s2o-calibration"
    (tmp_path / "bad.json").write_text('{"format": "sgl_slim.s2o_calibration/1"}')
    with pytest.raises(ConfigError, match=r"bad.json: model: missing") as exc:
        S2OConfig(enabled=True, calibration=str(tmp_path / "bad.json")).validate()
    assert exc.value.flag == "--s2o-calibration"


def test_audit_flags_check_the_variant_a_calibration_file_runs(tmp_path):
    # the file's variant (v1 here) is what the server runs, whatever --s2o-variant says
    path = _write_calibration(tmp_path / "c.json")
    for field, value, flag in (("audit_form", "split", "--s2o-audit-form"), ("audit_last", 256, "--s2o-audit-last")):
        with pytest.raises(ConfigError, match=r"this server runs v1 \(the variant of .*c.json\)") as exc:
            S2OConfig(enabled=True, variant="v5", block_size=16, segment_size=32, calibration=path,
                      **{field: value}).validate()
        assert exc.value.flag == flag
    v5 = _write_calibration(tmp_path / "v5.json", variant="v5")
    S2OConfig(enabled=True, block_size=16, segment_size=32, calibration=v5, audit_form="fused",
              audit_last=256).validate()


@pytest.mark.parametrize("content, match", [
    (None, "not a readable JSON file"),                        # no such file
    ("[]", "must be a JSON object"),
    ('{"format": "other"}', "format: must be"),
])
def test_launcher_exits_2_on_a_bad_calibration_file(tmp_path, capsys, content, match):
    from sgl_slim.launch import parse_slim_args
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        parse_slim_args(["--s2o", "--s2o-calibration", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--s2o-calibration" in err and match in err


def test_launcher_passes_a_good_calibration_file_to_the_config(tmp_path):
    from sgl_slim.launch import parse_slim_args
    path = _write_calibration(tmp_path / "c.json")
    cfg, argv, _ = parse_slim_args(["--s2o", "--s2o-block-size", "16", "--s2o-segment-size", "32",
                                    "--s2o-calibration", path, "--port", "1"])
    assert cfg.s2o.calibration == path and "--s2o-calibration" not in argv and path not in argv
    assert SlimConfig.from_json(cfg.to_json()).s2o.calibration == path


def test_adjust_server_args_suggests_larger_prefill_chunks_on_gpu_and_keeps_sglangs_default(caplog):
    with caplog.at_level(logging.INFO, logger="sgl_slim.s2o"):
        a = _args(chunked_prefill_size=None)
        sb.adjust_server_args(ON, a, cpu=False)
        assert a.chunked_prefill_size is None
        assert "--chunked-prefill-size" in caplog.text
        caplog.clear()
        sb.adjust_server_args(ON, _args(chunked_prefill_size=32768), cpu=False)   # the user chose: no hint
        sb.adjust_server_args(ON, _args(chunked_prefill_size=None), cpu=True)
    assert "--chunked-prefill-size" not in caplog.text


def test_adjust_server_args_is_a_no_op_when_s2o_is_off():
    a = _args()
    sb.adjust_server_args(SlimConfig(), a, cpu=True)
    assert a == _args()


# ---------------------------------------------------------------- with SGLang imported (slower)

@pytest.fixture(scope="module")
def backend_cls():
    pytest.importorskip("sglang")
    from sgl_slim.integration.s2o_attn_backend import S2OAttnBackend
    return S2OAttnBackend


def test_the_backend_module_is_imported_lazily():
    # Registering the backend (every SGLang process) must not import the class module: only building it does.
    import subprocess
    import sys
    code = ("import sys\nfrom sgl_slim.integration import s2o_backend\n"
            "print('LOADED' if 'sgl_slim.integration.s2o_attn_backend' in sys.modules else 'LAZY')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "LAZY", proc.stderr[-2000:]


def test_stock_backend_is_the_one_the_server_would_run_without_s2o(backend_cls, monkeypatch):
    from sgl_slim.integration import s2o_attn_backend
    runner = SimpleNamespace(decode_attention_backend_str="torch_native")
    for base, expect in (("fa3", "fa3"), (None, "torch_native"), ("s2o", "torch_native")):
        monkeypatch.setattr(s2o_attn_backend, "get_exec",
                            lambda base=base: SimpleNamespace(kernel=SimpleNamespace(attention_backend=base)))
        assert s2o_attn_backend.stock_backend_name(runner) == expect, base


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
        try:
            obj = importlib.import_module(module)
        except ImportError:          # Class.method: import the class's module, walk the attribute
            module, _, cls = module.rpartition(".")
            obj = getattr(importlib.import_module(module), cls)
        assert hasattr(obj, name), f"{path} is gone from this SGLang"


class _Pool:
    """Token-slot KV pool with SGLang's MHA interface (every layer shares one buffer here)."""

    def __init__(self, slots, hkv, d, dtype, layers=1):
        self.k = torch.zeros(slots, hkv, d, dtype=dtype)
        self.v = torch.zeros(slots, hkv, d, dtype=dtype)
        self.layer_num = layers

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v

    def set_kv_buffer(self, layer, loc, k, v, *args, **kwargs):
        self.k[loc.loc if hasattr(loc, "loc") else loc] = k
        self.v[loc.loc if hasattr(loc, "loc") else loc] = v


def _layer(hq=4, hkv=2, d=16, **kw):
    from sglang.srt.layers.radix_attention import AttentionType
    base = dict(layer_id=0, tp_q_head_num=hq, tp_k_head_num=hkv, tp_v_head_num=hkv, qk_head_dim=d, v_head_dim=d,
                head_dim=d, scaling=d ** -0.5, is_cross_attention=False, attn_type=AttentionType.DECODER,
                sliding_window_size=-1, use_irope=False, logit_cap=0.0, k_scale=None, v_scale=None,
                k_scale_float=None, v_scale_float=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _runner(pool, r2t, layers=1, hkv=2, d=16):
    mc = SimpleNamespace(num_hidden_layers=layers, head_dim=d, get_total_num_kv_heads=lambda: hkv)
    return SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=r2t), token_to_kv_pool=pool,
                           model_config=mc, decode_attention_backend_str="torch_native")


def _batch_and_backend(backend_cls, monkeypatch, cfg, seq_lens, ext, hq=4, hkv=2, d=16, seed=0, layers=1):
    """A batch whose prefixes are already in the pool (radix hits / earlier chunks) plus new tokens; the
    backend built by SGLang's factory path with torch_native as the stock backend."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sgl_slim.integration import s2o_attn_backend
    monkeypatch.setattr(sb, "check_runner", lambda runner: None)
    monkeypatch.setattr(s2o_attn_backend, "stock_backend_name", lambda runner: "torch_native")
    monkeypatch.setattr(s2o_attn_backend, "get_parallel", lambda: SimpleNamespace(tp_rank=0, tp_size=1))
    g = torch.Generator().manual_seed(seed)
    slots = 512
    pool = _Pool(slots, hkv, d, torch.float32, layers)
    pool.k.copy_(torch.randn(slots, hkv, d, generator=g))
    pool.v.copy_(torch.randn(slots, hkv, d, generator=g))
    r2t = torch.randperm(slots, generator=g)[: 4 * 100].view(4, 100).to(torch.int32)
    rows = torch.tensor([2, 0, 3][: len(seq_lens)])
    out_loc = torch.cat([r2t[r, s - n:s] for r, s, n in zip(rows.tolist(), seq_lens, ext)]).long()
    backend = backend_cls.from_runner(_runner(pool, r2t, layers, hkv, d), cfg)
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
    """SGLang's torch_native extend on the pool as it is (the new K/V already written)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    out = torch.empty(q.shape[0], layer.tp_q_head_num, layer.v_head_dim)
    TorchNativeAttnBackend._run_sdpa_forward_extend(
        None, q.view(-1, layer.tp_q_head_num, layer.qk_head_dim), out, pool.k, pool.v, r2t, fb.req_pool_indices,
        fb.seq_lens, fb.extend_prefix_lens, fb.extend_seq_lens, scaling=layer.scaling, enable_gqa=True, causal=True)
    return out.view(q.shape[0], -1)


def _log_lines(caplog):
    return [r.getMessage() for r in caplog.records if "S2O prefill rid=" in r.getMessage()]


@pytest.mark.parametrize("tau, min_length, reason", [
    (0.0, 0, "dense (--s2o-tau 0)"),
    (0.5, 1000, "dense (kv_len < --s2o-min-length 1000)"),
])
def test_dense_batches_run_on_the_stock_backend_bit_identically(backend_cls, monkeypatch, caplog, tau, min_length,
                                                                reason):
    # prefix hit (70 cached + 20 new), fresh prompt (37), one-token extension
    cfg = S2OConfig(enabled=True, tau=tau, block_size=16, segment_size=32, min_length=min_length)
    backend, fb, pool, r2t, q, k, v = _batch_and_backend(backend_cls, monkeypatch, cfg, [90, 37, 61], [20, 37, 1])
    layer = _layer()
    backend.init_forward_metadata(fb)
    assert backend.plan.route is sb.Route.STOCK
    dense_before = sb.STATS.dense_chunks
    with caplog.at_level(logging.INFO, logger="sgl_slim.s2o"):
        out = backend.forward_extend(q, k, v, layer, fb)
    assert torch.equal(pool.k[fb.out_cache_loc], k), "the stock backend must write the new K to the pool"
    assert torch.equal(out, _torch_native(pool, r2t, fb, layer, q)), "dense batches must equal the stock backend"
    assert sb.STATS.dense_chunks == dense_before + 3
    lines = _log_lines(caplog)
    assert len(lines) == 3 and all("density=1.0000" in line and reason in line for line in lines)


def test_mixed_batch_runs_whole_through_s2o_short_rows_dense(backend_cls, monkeypatch, caplog):
    # seqs 0 and 2 reach min_length (sparse, tau 1), seq 1 is short (S2O's dense group, tau 0)
    cfg = S2OConfig(enabled=True, tau=1.0, variant="v1", block_size=16, segment_size=32, min_length=60)  # no window
    backend, fb, pool, r2t, q, k, v = _batch_and_backend(backend_cls, monkeypatch, cfg, [96, 37, 80], [64, 37, 16])
    layer = _layer()
    with caplog.at_level(logging.INFO, logger="sgl_slim.s2o"):
        out = backend.forward_extend(q, k, v, layer, fb)                  # plan built lazily
    assert backend.plan.route is sb.Route.S2O
    assert [g.seq_ids for g in backend.plan.groups] == [(0, 2), (1,)]
    assert torch.equal(pool.k[fb.out_cache_loc], k), "new K must be written to the pool before attention"
    ref = _torch_native(pool, r2t, fb, layer, q)
    short = slice(64, 64 + 37)
    # the short sequence: dense fp32 attention, equal to SDPA up to summation order (~1e-6 on unit-scale data)
    torch.testing.assert_close(out[short], ref[short], rtol=1e-5, atol=1e-5)
    lines = _log_lines(caplog)
    assert len(lines) == 3
    assert "rid=r1" in lines[1] and "density=1.0000 dense (kv_len < --s2o-min-length 60)" in lines[1]
    dens = [float(line.split("density=")[1].split()[0]) for line in (lines[0], lines[2])]
    assert all(0 < x < 1 for x in dens), f"tau=1 on random keys should skip blocks, got densities {dens}"
    assert all("tau=1 " in line for line in (lines[0], lines[2]))
    long_rows = torch.cat([out[:64], out[101:]])
    long_ref = torch.cat([ref[:64], ref[101:]])
    assert not torch.equal(long_rows, long_ref) and (long_rows - long_ref).norm() / long_ref.norm() < 0.5


def test_calibrated_taus_per_layer_and_dense_layers_on_the_stock_backend(backend_cls, monkeypatch, tmp_path, caplog):
    path = _write_calibration(tmp_path / "c.json")          # layer 0: taus (1e-3, 2e-3), layer 1: all 0
    cfg = S2OConfig(enabled=True, tau=0.9, block_size=16, segment_size=32, min_length=0, calibration=path)
    backend, fb, pool, r2t, q, k, v = _batch_and_backend(backend_cls, monkeypatch, cfg, [96], [96], layers=2)
    assert backend.taus.tau(0) == (1e-3, 2e-3) and backend.taus.dense(1)
    calls = []
    monkeypatch.setattr(sb, "run_s2o_layer", lambda plan, *a, **kw: calls.append(kw) or
                        (torch.zeros(q.shape[0], 4, 16), torch.tensor([0.5], dtype=torch.float64)))
    backend.init_forward_metadata(fb)
    assert backend.plan.route is sb.Route.S2O
    with caplog.at_level(logging.INFO, logger="sgl_slim.s2o"):
        backend.forward_extend(q, k, v, _layer(layer_id=0), fb)
        out1 = backend.forward_extend(q, k, v, _layer(layer_id=1), fb)
    assert len(calls) == 1, "layer 1 (all taus 0) must not run S2O"
    assert torch.equal(calls[0]["tau"], torch.tensor([1e-3, 2e-3])) and calls[0]["variant"] == "v1"
    assert torch.equal(out1, _torch_native(pool, r2t, fb, _layer(), q)), "a tau-0 layer is the stock backend's"
    (line,) = _log_lines(caplog)
    assert "density=0.7500" in line and "tau=calibrated (0..0.002)" in line      # mean of 0.5 and 1.0


def test_audit_last_reaches_the_attention_call(backend_cls, monkeypatch):
    cfg = S2OConfig(enabled=True, tau=0.5, variant="v5", audit_last=64, audit_form="split", block_size=16,
                    segment_size=32, min_length=0)
    backend, fb, pool, r2t, q, k, v = _batch_and_backend(backend_cls, monkeypatch, cfg, [96], [96])
    calls = []
    monkeypatch.setattr(sb, "run_s2o_layer", lambda plan, *a, **kw: calls.append(kw) or
                        (torch.zeros(q.shape[0], 4, 16), torch.tensor([0.5], dtype=torch.float64)))
    backend.forward_extend(q, k, v, _layer(), fb)
    assert calls[0]["variant"] == "v5" and calls[0]["audit_last"] == 64 and calls[0]["audit_form"] == "split"


def test_a_calibration_for_another_model_fails_at_startup(backend_cls, monkeypatch, tmp_path):
    path = _write_calibration(tmp_path / "c.json", head_dim=128)
    cfg = S2OConfig(enabled=True, block_size=16, segment_size=32, calibration=path)
    with pytest.raises(ConfigError, match="head_dim 128 in the file, 16 in the model") as exc:
        _batch_and_backend(backend_cls, monkeypatch, cfg, [20], [20], layers=2)
    assert exc.value.flag == "--s2o-calibration"
    with pytest.raises(ConfigError, match="num_layers 2 in the file, 3 in the model"):
        _batch_and_backend(backend_cls, monkeypatch, S2OConfig(enabled=True, block_size=16, segment_size=32,
                                                                calibration=_write_calibration(tmp_path / "d.json")),
                           [20], [20], layers=3)


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


def test_encoder_only_layers_verify_decode_sinks_and_graphs_are_refused(backend_cls, monkeypatch):
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    cfg = S2OConfig(enabled=True, tau=0.0, block_size=16, segment_size=32, min_length=0)
    backend, fb, *_ , q, k, v = _batch_and_backend(backend_cls, monkeypatch, cfg, [20], [20])
    with pytest.raises(ConfigError, match="encoder_only"):
        backend.forward_extend(q, k, v, _layer(attn_type=AttentionType.ENCODER_ONLY), fb)
    with pytest.raises(ConfigError, match="sinks"):
        backend.forward_extend(q, k, v, _layer(), fb, sinks=torch.zeros(4))
    for mode, flag in ((ForwardMode.TARGET_VERIFY, "--speculative-attention-mode"),
                       (ForwardMode.DECODE, "--decode-attention-backend"),
                       (ForwardMode.DLLM_EXTEND, "--s2o")):
        fb.forward_mode = mode
        with pytest.raises(ConfigError) as exc:
            backend.init_forward_metadata(fb)
        assert exc.value.flag == flag, mode
    with pytest.raises(ConfigError) as exc:
        backend.forward_decode(q, k, v, _layer(), fb)
    assert exc.value.flag == "--decode-attention-backend"
    with pytest.raises(ConfigError) as exc:
        backend.init_forward_metadata_out_graph(fb, in_capture=True)
    assert exc.value.flag == "--cuda-graph-backend-prefill"
    with pytest.raises(ConfigError) as exc:
        backend.init_cuda_graph_state(8, 64)
    assert exc.value.flag == "--speculative-attention-mode"


def test_startup_checks_refuse_gpu_head_dims_and_dtypes():
    pytest.importorskip("sglang")

    def runner(kv_cache_dtype=None, **kw):
        mc = dict(is_encoder_decoder=False, is_generation=True, is_hybrid_swa=False, attention_chunk_size=None,
                  dtype=torch.bfloat16, head_dim=128, num_hidden_layers=2)
        mc.update(kw)
        return SimpleNamespace(model_config=SimpleNamespace(**mc), device="cuda", use_mla_backend=False,
                               kv_cache_dtype=kv_cache_dtype or mc["dtype"], decode_attention_backend_str="fa3")
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
    with pytest.raises(ConfigError, match="fp8_e4m3") as exc:
        sb.check_runner(runner(kv_cache_dtype=torch.float16))
    assert exc.value.flag == "--kv-cache-dtype"


def test_an_fp8_kv_cache_is_read_for_bf16_and_fp16_models_only():
    sb.check_kv_cache_dtype(torch.bfloat16, torch.float8_e4m3fn)
    sb.check_kv_cache_dtype(torch.float16, torch.float8_e5m2)
    sb.check_kv_cache_dtype(torch.bfloat16, torch.bfloat16)
    for model_dtype, cache in ((torch.bfloat16, torch.float16), (torch.bfloat16, torch.uint8),
                               (torch.float32, torch.float8_e4m3fn)):
        with pytest.raises(ConfigError, match="fp8_e4m3") as exc:
            sb.check_kv_cache_dtype(model_dtype, cache)
        assert exc.value.flag == "--kv-cache-dtype"


# ---------------------------------------------------------------- GPU: no host sync inside a layer

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("audit_form", ["fused", "split"])
def test_a_layer_forward_does_not_sync_with_the_host(audit_form):
    g = torch.Generator(device="cuda").manual_seed(0)
    hq, hkv, d, slots = 8, 2, 64, 4096
    k_pool = torch.randn(slots, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v_pool = torch.randn_like(k_pool)
    r2t = torch.randperm(slots, device="cuda", generator=g)[:2 * 1024].view(2, 1024).to(torch.int32)
    seq_lens, ext = [1024, 700], [512, 700]
    plan = sb.plan_batch(r2t, torch.tensor([1, 0], device="cuda"), seq_lens, ext, taus=sb.LayerTaus(default=1e-3),
                         min_length=800)                     # one sparse, one dense group
    q = torch.randn(sum(ext), hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kw = dict(tau=1e-3, block_size=64, segment_size=256, sm_scale=d ** -0.5, audit_form=audit_form)
    sb.run_s2o_layer(plan, q, k_pool, v_pool, **kw)         # warm-up: Triton compiles outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = sb.run_s2o_layer(plan, q, k_pool, v_pool, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == q.shape
