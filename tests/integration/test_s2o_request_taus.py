"""S2O with per-request settings, without a server: each sequence of a forward batch runs with its request's
own tau (``s2o_tau``) or dense (``s2o`` false), one launch per tau; a batch without settings is planned exactly
as before; the scheduler files settings by rid for the backend and forgets them when the request finishes."""

from types import SimpleNamespace

import pytest
import torch

from sgl_slim.integration import request_hooks
from sgl_slim.integration import s2o_backend as sb
from sgl_slim.request_settings import CARRIER_KEY, RequestSettings

KW = dict(block_size=16, segment_size=32, sm_scale=0.25, variant="v1")
SERVER = sb.LayerTaus(default=0.3, variant="v1")


def _batch(seed=5):
    g = torch.Generator().manual_seed(seed)
    k_pool, v_pool = torch.randn(512, 2, 16, generator=g), torch.randn(512, 2, 16, generator=g)
    r2t = torch.randperm(512, generator=g)[:500].view(5, 100).to(torch.int32)
    rows = torch.tensor([3, 0, 4, 1, 2])
    seq_lens, ext = [96, 90, 80, 70, 20], [64, 90, 16, 70, 20]
    q = torch.randn(sum(ext), 4, 16, generator=g)
    return r2t, rows, seq_lens, ext, q, k_pool, v_pool


def test_no_request_taus_plan_exactly_as_before():
    r2t, rows, seq_lens, ext, *_ = _batch()
    before = sb.plan_batch(r2t, rows, seq_lens, ext, taus=SERVER, min_length=40)
    for seq_taus in (None, (None,) * 5, (0.3, None, 0.3, None, None)):      # the server's own tau: the same
        after = sb.plan_batch(r2t, rows, seq_lens, ext, taus=SERVER, min_length=40, seq_taus=seq_taus)
        assert after.seq_taus is None and after.reasons == before.reasons and not after.own_taus
        assert [(g.sparse, g.seq_ids, g.tau) for g in after.groups] == [(g.sparse, g.seq_ids, g.tau)
                                                                       for g in before.groups]
        assert [(True, (0, 1, 2, 3), None), (False, (4,), None)] == [(g.sparse, g.seq_ids, g.tau)
                                                                       for g in after.groups]


def test_one_launch_per_tau_and_dense_requests_join_the_dense_launch():
    r2t, rows, seq_lens, ext, *_ = _batch()
    plan = sb.plan_batch(r2t, rows, seq_lens, ext, taus=SERVER, min_length=40,
                         seq_taus=(None, 0.5, 0.0, 0.5, 0.2))
    assert [(g.sparse, g.seq_ids, g.tau) for g in plan.groups] == [
        (True, (0,), None), (True, (1, 3), 0.5), (False, (2, 4), None)]
    R = sb.DenseReason
    assert plan.reasons == (R.NONE, R.NONE, R.REQUEST, R.NONE, R.SHORT) and plan.own_taus
    with pytest.raises(ValueError, match="2 per-request taus for a batch of 5"):
        sb.plan_batch(r2t, rows, seq_lens, ext, taus=SERVER, min_length=40, seq_taus=(None, 0.5))


def test_a_batch_dense_by_its_requests_goes_to_the_stock_backend():
    r2t, rows, seq_lens, ext, *_ = _batch()
    plan = sb.plan_batch(r2t, rows, seq_lens, ext, taus=SERVER, min_length=40, seq_taus=(0.0,) * 4 + (None,))
    assert plan.route is sb.Route.STOCK and plan.groups == ()
    assert plan.reasons == (sb.DenseReason.REQUEST,) * 4 + (sb.DenseReason.SHORT,)


def test_a_request_tau_runs_sparse_on_a_dense_server():
    r2t, rows, seq_lens, ext, *_ = _batch()
    zero = sb.LayerTaus(default=0.0)
    assert sb.plan_batch(r2t, rows, seq_lens, ext, taus=zero, min_length=40).route is sb.Route.STOCK
    plan = sb.plan_batch(r2t, rows, seq_lens, ext, taus=zero, min_length=40, seq_taus=(None, 0.3, None, None, 0.3))
    assert plan.route is sb.Route.S2O and plan.own_taus
    assert [(g.sparse, g.seq_ids, g.tau) for g in plan.groups] == [(True, (1,), 0.3), (False, (0, 2, 3, 4), None)]
    assert plan.reasons[0] is sb.DenseReason.TAU_ZERO and plan.reasons[4] is sb.DenseReason.SHORT


def _alone(b, tau, r2t, rows, seq_lens, ext, q, k_pool, v_pool):
    """Sequence b served by itself on a server whose tau is ``tau``: its output rows and density."""
    start = sum(ext[:b])
    (group,) = sb.build_launch_groups(r2t, rows[b:b + 1], seq_lens[b:b + 1], ext[b:b + 1], min_length=0)
    plan = sb.S2OBatchPlan(route=sb.Route.S2O, groups=(group,), seq_lens=(seq_lens[b],), extend_lens=(ext[b],),
                           reasons=(sb.DenseReason.NONE,), rids=None)
    out, dens = sb.run_s2o_layer(plan, q[start:start + ext[b]], k_pool, v_pool, tau=tau, **KW)
    return out, dens[0]


def test_each_sequence_gets_what_its_tau_gives_it_alone():
    r2t, rows, seq_lens, ext, q, k_pool, v_pool = _batch()
    seq_taus = (None, 1.0, 0.0, 0.6, 0.6)
    plan = sb.plan_batch(r2t, rows, seq_lens, ext, taus=SERVER, min_length=40, seq_taus=seq_taus)
    out, dens = sb.run_s2o_layer(plan, q, k_pool, v_pool, tau=SERVER.default, **KW)
    starts = [sum(ext[:b]) for b in range(5)]
    for b, own in enumerate(seq_taus):
        tau = SERVER.default if own is None else own
        if seq_lens[b] < 40:
            tau = 0.0
        want, want_density = _alone(b, tau, r2t, rows, seq_lens, ext, q, k_pool, v_pool)
        torch.testing.assert_close(out[starts[b]:starts[b] + ext[b]], want, rtol=1e-5, atol=1e-6)
        assert float(dens[b]) == pytest.approx(float(want_density)), b
    # the requests' taus took effect: sparse where they asked for more than the server's tau, dense where 0
    assert float(dens[1]) < float(dens[0]) and float(dens[3]) < 1.0 and float(dens[2]) == float(dens[4]) == 1.0


def test_the_scheduler_files_settings_by_rid_and_forgets_finished_requests(monkeypatch):
    table = request_hooks.SettingsByRid(max_rids=2)
    monkeypatch.setattr(request_hooks, "SCHEDULED", table)

    def req(rid, settings):
        custom = {CARRIER_KEY: settings} if settings is not None else None
        return SimpleNamespace(rid=rid, sampling_params=SimpleNamespace(custom_params=custom))

    assert request_hooks.s2o_taus(("a", "b")) is None                          # nothing filed: no work
    request_hooks._add_request_to_queue_before(None, req("a", {"s2o": False}))
    request_hooks._add_request_to_queue_before(None, req("b", None))          # no settings: not filed
    request_hooks._add_request_to_queue_before(None, req("c", {"s2o_tau": 0.25}))
    request_hooks._add_request_to_queue_before(None, req("d", {"idpruner_keep_ratio": 0.5}))
    assert len(table) == 2 and table.get("a") is None                         # bounded: the oldest went first
    assert table.get("c") == RequestSettings(s2o_tau=0.25)
    assert request_hooks.s2o_taus(("b", "c", "d")) == (None, 0.25, None)
    assert request_hooks.s2o_taus(("b", "d")) is None                         # d has settings, none for S2O
    from sgl_slim.config import SlimConfig  # noqa: PLC0415
    from sgl_slim.integration import metrics  # noqa: PLC0415
    monkeypatch.setattr(metrics, "SCHEDULED", table)
    finished = req("c", {"s2o_tau": 0.25})
    finished.multimodal_inputs = None
    assert metrics.request_numbers(finished, SlimConfig(), None) == {"s2o_tau": 0.25}      # echoed
    assert table.get("c") is None
