"""sgl_slim.integration.containment against SGLang's own classes (no server): the per-item fallback, the exact
restore of a processor output after a failed transform, one log line and one counter increment per fallback,
and the fixes for Qwen2-Audio that every launched server gets (per-item clip lengths, finite samples)."""

import logging
import types

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalProcessorOutput  # noqa: E402
from sglang.srt.models.qwen2_audio import Qwen2AudioForConditionalGeneration  # noqa: E402

from sgl_slim.integration import containment as ct  # noqa: E402


@pytest.fixture
def log_lines():
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("sgl_slim")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


@pytest.fixture
def counted(monkeypatch):
    """Fallbacks counted for Prometheus, as (feature, reason), with metrics on in this process."""
    from sgl_slim.integration import metrics  # noqa: PLC0415

    calls = []
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent-not-written")
    monkeypatch.setattr(metrics.PROMETHEUS, "count_fallback", lambda f, r, model: calls.append((f, r)))
    return calls


@pytest.mark.parametrize("n,k", [(1, 1), (5, 1), (5, 5), (7, 3), (1000, 999)])
def test_evenly_spaced_is_a_valid_keep(n, k):
    keep = ct.evenly_spaced(n, k)
    assert ct.valid_keep(keep, n, k)
    assert int(keep[0]) == 0


@pytest.mark.parametrize("keep,ok", [(torch.tensor([0, 2, 4]), True), (torch.tensor([0, 2, 2]), False),
                                     (torch.tensor([2, 0, 4]), False), (torch.tensor([0, 2, 5]), False),
                                     (torch.tensor([-1, 2, 4]), False), (torch.tensor([0, 2]), False),
                                     (torch.tensor([0., 2., 4.]), False), (None, False)])
def test_valid_keep(keep, ok):
    assert ct.valid_keep(keep, 5, 3) is ok


def test_contain_passes_results_through_untouched(log_lines, counted):
    assert ct.contain("vision", "image", lambda: "work", lambda: "fallback") == "work"
    assert log_lines == [] and counted == []


@pytest.mark.parametrize("data,reason", [(torch.tensor([[1.0, float("nan")]]), "nonfinite"),
                                         (torch.zeros(0, 4), "empty"), (torch.ones(2, 2), "error"), (None, "error")])
def test_contain_falls_back_with_one_line_and_one_count(data, reason, log_lines, counted):
    def work():
        raise ValueError("idpruner: features contains NaN or inf\nsecond line not logged")

    assert ct.contain("vision", "image of 2 tokens (keep 1)", work, lambda: "fallback", data=data) == "fallback"
    assert log_lines == [f"sgl_slim vision: fallback ({reason}): image of 2 tokens (keep 1): ValueError: idpruner: "
                         f"features contains NaN or inf; used an evenly spaced selection"]
    assert counted == [("vision", reason)]


def test_contain_refuses_an_invalid_result(log_lines, counted):
    got = ct.contain("audio", "clip 0", lambda: torch.tensor([3, 1]), lambda: ct.evenly_spaced(4, 2),
                     valid=lambda keep: ct.valid_keep(keep, 4, 2))
    assert got.tolist() == [0, 2]
    assert log_lines == ["sgl_slim audio: fallback (error): clip 0: invalid result; used an evenly spaced selection"]
    assert counted == [("audio", "error")]


def test_contain_does_not_catch_keyboard_interrupt():
    def work():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ct.contain("vision", "image", work, lambda: None)


def test_no_count_without_metrics(log_lines, monkeypatch):
    from sgl_slim.integration import metrics  # noqa: PLC0415

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(metrics.PROMETHEUS, "count_fallback", lambda *a: pytest.fail("counted without metrics"))
    ct.record_fallback("vision", "error", "x")
    assert log_lines == ["sgl_slim vision: fallback (error): x"]


# --- tokenizer side: a failed transform leaves the request exactly as SGLang built it -----------------------

def _audio_item(start, end, clips=1, mel=4, frames=10, seed=0):
    feature = torch.randn(clips, mel, frames, generator=torch.Generator().manual_seed(seed))
    return MultimodalDataItem(modality=Modality.AUDIO, offsets=[(start, end)], feature=feature, hash=100 + seed)


def _output(items, ids):
    return MultimodalProcessorOutput(mm_items=items, input_ids=list(ids), padded_input_ids=None)


def test_failed_transform_restores_the_output_exactly(log_lines, counted):
    items = [_audio_item(1, 4, seed=0), _audio_item(6, 8, seed=1)]
    items[0].model_specific_data["feature_attention_mask"] = torch.ones(1, 10)
    out = _output(items, [1, 7, 7, 7, 7, 1, 7, 7, 7, 1])
    before = (list(out.input_ids), [(it.offsets, it.hash, it.pad_value, dict(it.model_specific_data)) for it in items])

    def half_done(o):
        o.input_ids = o.input_ids[:5]
        o.mm_items[0].offsets = [(1, 2)]
        o.mm_items[0].set_hash(12345)
        o.mm_items[0].model_specific_data["samp_keep"] = [2]
        o.mm_items[1].audio_feature_lens = torch.tensor([3])
        raise IndexError("bug in the middle of a transform")

    assert ct.contain_output("audio", out, half_done) is out
    after = (list(out.input_ids), [(it.offsets, it.hash, it.pad_value, dict(it.model_specific_data)) for it in items])
    assert after == before
    assert not hasattr(items[1], "audio_feature_lens"), "an attribute added by the failed transform survived"
    assert log_lines == ["sgl_slim audio: fallback (error): placeholder shrinking failed (IndexError: bug in the "
                         "middle of a transform); request served without Samp"]
    assert counted == [("audio", "error")]


# --- Qwen2-Audio: stock SGLang's crash with several clips, and clips that are not finite ---------------------

class _Tower:
    dtype = torch.float32

    def __call__(self, features):                                   # [C, mel, T] -> last_hidden_state [C, T, mel]
        return types.SimpleNamespace(last_hidden_state=features.transpose(1, 2))


def _stock_model():
    return types.SimpleNamespace(audio_tower=_Tower(), multi_modal_projector=lambda x: x)


def _stock_four_clips():
    """What SGLang's Qwen2-Audio processor returns for 4 clips: one item per clip, every clip's length on the
    first item only."""
    runs = [(1, 4), (6, 8), (10, 14), (16, 17)]
    items = [_audio_item(s, e, seed=i) for i, (s, e) in enumerate(runs)]
    items[0].audio_feature_lens = torch.tensor([e - s + 1 for s, e in runs])
    return _output(items, [0] * 19), runs


def test_stock_processor_output_crashes_sglangs_get_audio_feature():
    out, _ = _stock_four_clips()
    with pytest.raises(AttributeError, match="audio_feature_lens"):
        Qwen2AudioForConditionalGeneration.get_audio_feature(_stock_model(), out.mm_items)


def test_per_item_lengths_fix_sglangs_get_audio_feature():
    out, runs = _stock_four_clips()
    ct.prepare_audio_output(out)
    assert [it.audio_feature_lens.tolist() for it in out.mm_items] == [[e - s + 1] for s, e in runs]
    got = Qwen2AudioForConditionalGeneration.get_audio_feature(_stock_model(), out.mm_items)
    want = torch.cat([it.feature[0].T[:e - s + 1] for it, (s, e) in zip(out.mm_items, runs)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_clip_is_a_client_error(value):
    out, _ = _stock_four_clips()
    out.mm_items[2].feature[0, 1, 3] = value
    with pytest.raises(ValueError, match="audio clip 2 gives non-finite audio features"):
        ct.prepare_audio_output(out)


def test_items_without_raw_features_are_left_alone():
    pre = MultimodalDataItem(modality=Modality.AUDIO, offsets=[(0, 3)], precomputed_embeddings=torch.zeros(4, 8))
    image = MultimodalDataItem(modality=Modality.IMAGE, offsets=[(5, 6)], feature=torch.full((2, 3), float("nan")))
    out = _output([pre, image], [0] * 8)
    ct.prepare_audio_output(out)
    assert not hasattr(pre, "audio_feature_lens") and not hasattr(image, "audio_feature_lens")


def test_a_clip_too_short_for_a_token_keeps_its_zero_length():
    """A clip of a few samples has 0 tokens and no placeholder run: its length (0) must still line up with its
    row of features, from the mel mask (the chaos sweep found a 1-sample clip beside others)."""
    runs = [(1, 4), None, (6, 8)]
    items = []
    for i, run in enumerate(runs):
        item = _audio_item(*(run or (0, 0)), seed=i)
        item.offsets = [run] if run else []
        frames = 2 * 2 * (run[1] - run[0] + 1) if run else 1          # mel frames giving the run's token count
        mask = torch.zeros(1, 40, dtype=torch.long)
        mask[0, :frames] = 1
        item.model_specific_data["feature_attention_mask"] = mask
        items.append(item)
    items[0].audio_feature_lens = torch.tensor([4, 0, 3])
    ct.prepare_audio_output(_output(items, [0] * 10))
    assert [it.audio_feature_lens.tolist() for it in items] == [[4], [0], [3]]
