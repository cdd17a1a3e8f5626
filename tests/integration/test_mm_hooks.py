"""The multimodal hooks' shared part (sgl_slim.integration.mm_hooks) on stand-ins shaped like SGLang's objects:
placeholder shrinking, the settings hash and what it records, the install-once hook state."""

from types import SimpleNamespace

import pytest

from sgl_slim.config import IDPrunerConfig, SampConfig, SlimConfig
from sgl_slim.integration import metrics, mm_hooks

P, T = 9, 1          # placeholder, text


class Item:
    def __init__(self, offsets, hash=None):
        self.offsets, self.hash, self.feature, self.model_specific_data = offsets, hash, "raw", {}

    def set_hash(self, value):
        self.hash = value


def _output():
    # T [P P P P] T [P P] T T [P P P]   (the second item has two runs)
    a, b = Item([(1, 4)], hash=10), Item([(6, 7), (10, 12)], hash=20)
    ids = [T, P, P, P, P, T, P, P, T, T, P, P, P]
    return SimpleNamespace(mm_items=[b, a], input_ids=ids, padded_input_ids=None), a, b


def test_runs_are_in_sequence_order_with_their_keep_counts():
    out, a, b = _output()
    runs = mm_hooks.placeholder_runs(out, lambda item, n: n - 1 if item is b else None)
    assert [(r.start, r.end, r.item, r.index, r.n, r.keep) for r in runs] == [
        (1, 4, a, 0, 4, 4), (6, 7, b, 0, 2, 1), (10, 12, b, 1, 3, 2)]


def test_drop_placeholders_keeps_each_runs_head_and_shifts_later_offsets():
    out, a, b = _output()
    runs = mm_hooks.placeholder_runs(out, lambda item, n: 1 if item is a else n - 1)
    cols = mm_hooks.drop_placeholders(out, runs)
    assert cols == [0, 1, 5, 6, 8, 9, 10, 11]
    assert out.input_ids == [T, P, T, P, T, T, P, P]
    assert a.offsets == [(1, 1)] and b.offsets == [(3, 3), (6, 7)]


def test_nothing_kept_short_leaves_ids_and_offsets():
    out, a, b = _output()
    ids = list(out.input_ids)
    cols = mm_hooks.drop_placeholders(out, mm_hooks.placeholder_runs(out, lambda item, n: None))
    assert cols == list(range(len(ids))) and out.input_ids == ids
    assert a.offsets == [(1, 4)] and b.offsets == [(6, 7), (10, 12)]


def test_mark_shrunk_records_the_count_for_the_metrics_and_mixes_the_settings():
    out, a, _ = _output()
    mm_hooks.mark_shrunk(a, 4, lambda base: mm_hooks.hash_settings("x-v1", base, "0.5"))
    assert a.model_specific_data[metrics.TOKENS_BEFORE_KEY] == 4
    assert a.hash == mm_hooks.hash_settings("x-v1", 10, "0.5")
    assert len({mm_hooks.hash_settings("x-v1", 10, "0.5"), mm_hooks.hash_settings("x-v1", 10, "0.25"),
                mm_hooks.hash_settings("y-v1", 10, "0.5"), mm_hooks.hash_settings("x-v1", 11, "0.5")}) == 4
    assert 0 <= a.hash < 2 ** 64


def test_feature_hooks_register_once_and_only_when_on(monkeypatch):
    pytest.importorskip("sglang")
    from sglang.srt.plugins.hook_registry import HookRegistry

    calls = []
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, *a: calls.append(a)))
    hook = lambda *a: None  # noqa: E731
    hooks = mm_hooks.FeatureHooks("samp", lambda: [("some.target", hook, "AROUND")])
    hooks.install(SlimConfig())
    assert calls == [] and not hooks.on and hooks.cfg == SampConfig()
    on = SlimConfig(samp=SampConfig(enabled=True, keep_ratio=0.5))
    hooks.install(on)
    hooks.install(on)
    assert len(calls) == 1 and calls[0][:2] == ("some.target", hook) and calls[0][2].name == "AROUND"
    assert hooks.on and hooks.cfg.keep_ratio == 0.5
    hooks.install(SlimConfig(idpruner=IDPrunerConfig(enabled=True)))     # settings follow the latest install
    assert not hooks.on and len(calls) == 1
