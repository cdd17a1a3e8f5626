"""sgl_slim.integration.metrics without a server: what a finished request reports, how it travels through SGLang's
customized-info seam, and what Prometheus sees. Fakes stand in for SGLang's Req / multimodal items."""

from types import SimpleNamespace

import pytest
import torch

from sgl_slim.config import IDPrunerConfig, S2OConfig, SampConfig, SlimConfig
from sgl_slim.integration import metrics

BEFORE = metrics.TOKENS_BEFORE_KEY    # set by a feature's tokenizer hook on the items it shrank

ALL_ON = SlimConfig(s2o=S2OConfig(enabled=True), idpruner=IDPrunerConfig(enabled=True),
                    samp=SampConfig(enabled=True))


class Item:
    def __init__(self, modality, offsets, msd=None, audio_lens=None):
        self.modality, self.offsets, self.model_specific_data = modality, offsets, dict(msd or {})
        if audio_lens is not None:
            self.audio_feature_lens = torch.tensor(audio_lens)

    def is_image(self):
        return self.modality == "image"

    def is_video(self):
        return self.modality == "video"

    def is_audio(self):
        return self.modality == "audio"


class Req:
    def __init__(self, rid, items=(), finished=True, verify=0, correct=0):
        self.rid = rid
        self.multimodal_inputs = SimpleNamespace(mm_items=list(items)) if items else None
        self._finished, self.spec_verify_ct, self.spec_num_correct_drafts = finished, verify, correct

    def finished(self):
        return self._finished


@pytest.fixture
def s2o_table(monkeypatch):
    table = metrics.S2OTable(max_rids=3)
    table.enabled = True
    monkeypatch.setattr(metrics, "S2O_TABLE", table)
    return table


def test_s2o_density_is_weighted_by_causal_pairs_over_chunks(s2o_table):
    # chunk 1: 4 new tokens, no prefix -> 10 causal pairs; chunk 2: 4 new after 4 -> 16 + 10 = 26 pairs
    metrics.record_s2o("a", 4, 4, 1.0, False)
    metrics.record_s2o("a", 8, 4, 0.5, True)
    got = s2o_table.pop("a")
    assert got["s2o_density"] == pytest.approx((1.0 * 10 + 0.5 * 26) / 36)
    assert got["s2o_sparse"] is True
    assert s2o_table.pop("a") is None and len(s2o_table) == 0          # popped once: nothing left behind


def test_s2o_short_request_reports_dense_and_table_is_bounded(s2o_table):
    metrics.record_s2o("short", 5, 5, 1.0, False)
    assert s2o_table.pop("short") == {"s2o_density": 1.0, "s2o_sparse": False}
    for i in range(10):                                                 # never finished: oldest evicted
        metrics.record_s2o(f"r{i}", 4, 4, 1.0, False)
    assert len(s2o_table) == 3 and s2o_table.pop("r0") is None and s2o_table.pop("r9") is not None
    assert s2o_table.evicted == 7
    metrics.record_s2o(None, 4, 4, 1.0, False)                          # no rid: ignored
    s2o_table.enabled = False
    metrics.record_s2o("off", 4, 4, 1.0, False)                         # S2O not on through sgl_slim: ignored
    assert s2o_table.pop("off") is None


def test_image_video_and_audio_counts():
    items = [
        Item("image", [(3, 10)], {BEFORE: 32}),        # pruned: 8 of 32
        Item("image", [(20, 23)]),                     # not pruned (K == N): 4 of 4
        Item("audio", [(30, 35), (40, 41)], {BEFORE: 14}, audio_lens=[10, 4]),   # 8 of 14
        Item("audio", [(50, 52)], audio_lens=[3]),     # keep ratio 1.0: 3 of 3
        Item("video", [(60, 99)]),                     # not pruned: 40 of 40
        Item("video", [(100, 109), (112, 121)], {BEFORE: 80}),   # pruned, one run per frame group: 20 of 80
    ]
    assert metrics.vision_token_counts(items) == (12 + 40 + 20, 36 + 40 + 80)
    assert metrics.audio_token_counts(items) == (11, 17)


def test_request_numbers_only_the_fields_that_apply(s2o_table):
    metrics.record_s2o("v", 100, 100, 0.25, True)
    req = Req("v", [Item("image", [(3, 10)], {BEFORE: 32})])
    assert metrics.request_numbers(req, ALL_ON, None) == {
        "s2o_density": 0.25, "s2o_sparse": True, "vision_tokens_kept": 8, "vision_tokens_total": 32}
    only_samp = SlimConfig(samp=SampConfig(enabled=True))
    assert metrics.request_numbers(Req("t"), only_samp, None) == {}                      # text request
    assert metrics.request_numbers(req, only_samp, None) == {}                           # image, Samp only
    spec = metrics.request_numbers(Req("d", verify=5, correct=7), only_samp, 4)
    assert spec == {"draft_tokens_proposed": 15, "draft_tokens_accepted": 7}


class FakeStreamer:
    """The part of SGLang's SchedulerOutputStreamer interface the subclass relies on."""
    has_additional_customized_info = False

    def __init__(self, spec_on=False):
        self.spec_algorithm = SimpleNamespace(is_none=lambda: not spec_on)
        self.server_args = SimpleNamespace(speculative_num_draft_tokens=4 if spec_on else None)

    def build_additional_customized_info(self, reqs):
        return {}

    def should_build_additional_customized_info(self):
        return True

    def is_request_level_customized_info_key(self, key):
        return False


class BuildingStreamer(FakeStreamer):
    has_additional_customized_info = True

    def build_additional_customized_info(self, reqs):
        return {"other": [[len(reqs)]] * len(reqs)}


def test_streamer_emits_once_per_finished_request(monkeypatch, s2o_table):
    monkeypatch.setattr(metrics, "_CFG", ALL_ON)
    cls = metrics.streamer_class(FakeStreamer)
    assert cls is metrics.streamer_class(FakeStreamer) and issubclass(cls, FakeStreamer)
    assert cls.has_additional_customized_info and not FakeStreamer.has_additional_customized_info
    streamer = cls()
    assert streamer.is_request_level_customized_info_key(metrics.KEY)
    assert not streamer.is_request_level_customized_info_key("other")
    running = Req("run", [Item("image", [(0, 3)], {BEFORE: 16})], finished=False)
    assert streamer.build_additional_customized_info([running]) == {}   # nothing finished: nothing sent
    done = Req("done", [Item("image", [(0, 3)], {BEFORE: 16})])
    text = Req("text")
    out = streamer.build_additional_customized_info([running, done, text])
    assert out == {metrics.KEY: [[], [{"vision_tokens_kept": 4, "vision_tokens_total": 16}], []]}


def test_streamer_keeps_a_base_class_fields_and_reports_drafts(monkeypatch, s2o_table):
    monkeypatch.setattr(metrics, "_CFG", SlimConfig(samp=SampConfig(enabled=True)))
    streamer = metrics.streamer_class(BuildingStreamer)()
    BuildingStreamer.__init__(streamer, spec_on=True)
    out = streamer.build_additional_customized_info([Req("a", verify=2, correct=3), Req("b", finished=False)])
    assert out["other"] == [[2], [2]]
    assert out[metrics.KEY] == [[{"draft_tokens_proposed": 6, "draft_tokens_accepted": 3}], []]


def test_the_real_streamer_class_accepts_the_subclass():
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
    cls = metrics.streamer_class(SchedulerOutputStreamer)
    assert issubclass(cls, SchedulerOutputStreamer) and cls.has_additional_customized_info
    assert not SchedulerOutputStreamer.has_additional_customized_info   # SGLang's own class untouched


def _tokenizer(enable_metrics):
    return SimpleNamespace(enable_metrics=enable_metrics, server_args=SimpleNamespace(served_model_name="m-test"))


def test_tokenizer_hook_flattens_and_passes_other_keys_on():
    seen = []

    def original(self, meta_info, state, customized_info, index, finish_reason):
        seen.append(customized_info)
        for key, values in customized_info.items():
            meta_info[key] = values[index]

    state = SimpleNamespace(obj=SimpleNamespace(log_metrics=True))
    numbers = {"vision_tokens_kept": 4, "vision_tokens_total": 16}
    meta = {}
    info = {metrics.KEY: [[], [numbers]], "other": [[1], [2]]}
    metrics._update_request_meta_info_around(original, _tokenizer(False), meta, state, info, 1, None)
    assert meta == {metrics.KEY: numbers, "other": [2]} and seen == [{"other": [[1], [2]]}]
    assert metrics.KEY in info                                         # the shared batch dict is not mutated
    meta, seen[:] = {}, []
    metrics._update_request_meta_info_around(original, _tokenizer(False), meta, state, {metrics.KEY: [[], [numbers]]},
                                             0, None)
    assert meta == {} and seen == []                                    # a request without numbers: no key


def _sample(name, **labels):
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_prometheus_series_count_once_per_finished_request():
    state = SimpleNamespace(obj=SimpleNamespace(log_metrics=True))
    numbers = {"s2o_density": 0.3, "s2o_sparse": True, "vision_tokens_kept": 4, "vision_tokens_total": 16,
               "audio_tokens_kept": 6, "audio_tokens_total": 10, "draft_tokens_proposed": 9,
               "draft_tokens_accepted": 5}
    names = [("sgl_slim_vision_tokens_total", {"kind": "kept"}), ("sgl_slim_vision_tokens_total", {"kind": "original"}),
             ("sgl_slim_audio_tokens_total", {"kind": "kept"}), ("sgl_slim_draft_tokens_total", {"kind": "accepted"}),
             ("sgl_slim_requests_total", {"feature": "draft"}), ("sgl_slim_s2o_density_count", {"mode": "sparse"}),
             ("sgl_slim_s2o_density_bucket", {"mode": "sparse", "le": "0.2"}),
             ("sgl_slim_s2o_density_bucket", {"mode": "sparse", "le": "0.3"})]
    metrics.PROMETHEUS._series()
    before = [_sample(n, model_name="m-test", **lab) for n, lab in names]
    for _ in range(2):
        metrics._update_request_meta_info_around(lambda *a: None, _tokenizer(True), {}, state,
                                                 {metrics.KEY: [[numbers]]}, 0, None)
    metrics._update_request_meta_info_around(lambda *a: None, _tokenizer(False), {}, state,   # metrics off
                                             {metrics.KEY: [[numbers]]}, 0, None)
    after = [_sample(n, model_name="m-test", **lab) for n, lab in names]
    assert [a - b for a, b in zip(after, before)] == [8, 32, 12, 10, 2, 2, 0, 2]


def test_openai_metadata_carries_the_numbers():
    numbers = {"audio_tokens_kept": 6, "audio_tokens_total": 10}
    assert metrics._endpoint_metadata_after({"weight_version": "w"}, {metrics.KEY: numbers}) == {
        "weight_version": "w", metrics.KEY: numbers}
    assert metrics._endpoint_metadata_after({"weight_version": "w"}, {}) == {"weight_version": "w"}


def test_install_registers_nothing_with_every_feature_off(monkeypatch):
    calls = []
    from sglang.srt.plugins.hook_registry import HookRegistry
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, *a, **k: calls.append(a)))
    monkeypatch.setattr(metrics, "_REGISTERED", False)
    metrics.install(SlimConfig())
    assert calls == []
    metrics.install(ALL_ON)
    metrics.install(ALL_ON)
    assert sorted(c[0] for c in calls) == sorted([metrics._GET_STREAMER, metrics._UPDATE_META,
                                                  metrics._ENDPOINT_METADATA])
