"""Samp's SGLang glue, without starting SGLang: the tokenizer-side placeholder shrink and the scheduler-side
compression, on stand-ins shaped like SGLang's objects (the end-to-end tests run the real ones)."""

import pytest
import torch
from torch import nn

from sgl_slim.audio import attention_stats, layer_attention_probs, pool_stats, samp_compress_ref
from sgl_slim.config import SampConfig
from sgl_slim.integration.metrics import audio_token_counts
from sgl_slim.integration.samp_hooks import (KEEP_KEY, RATIO_KEY, audio_token_lengths, compress_audio_feature,
                                             settings_hash, shrink_placeholders)

AUDIO, TEXT = 7, 1


class Item:
    """The fields of sglang's MultimodalDataItem that the hooks touch."""

    def __init__(self, modality, offsets, feature=None, hash=None, mask=None):
        self.modality, self.offsets, self.feature, self.hash, self.pad_value = modality, offsets, feature, hash, None
        self.model_specific_data = {} if mask is None else {"feature_attention_mask": mask}

    def is_audio(self):
        return self.modality == "audio"

    def set_hash(self, value):
        self.hash, self.pad_value = value, value % 1000


class Output:
    def __init__(self, items, ids):
        self.mm_items, self.input_ids, self.padded_input_ids = items, ids, None


def _mask(mel_frames, total=80):
    m = torch.zeros(1, total, dtype=torch.long)
    m[0, :mel_frames] = 1
    return m


def test_audio_token_lengths_follow_qwen2_audio():
    assert audio_token_lengths(torch.cat([_mask(80), _mask(41), _mask(5), _mask(2)])) == [20, 10, 1, 0]


def test_shrink_two_clips_and_an_image():
    # ids: T T [A x10] T [I x4] T [A x5] T
    ids = [TEXT, TEXT] + [AUDIO] * 10 + [TEXT] + [9] * 4 + [TEXT] + [AUDIO] * 5 + [TEXT]
    a1 = Item("audio", [(2, 11)], torch.zeros(1, 4, 80), hash=111, mask=_mask(41))      # N=10
    img = Item("image", [(13, 16)], torch.zeros(4, 3), hash=222)
    a2 = Item("audio", [(18, 22)], torch.zeros(1, 4, 80), hash=333, mask=_mask(21))     # N=5
    samp = SampConfig(enabled=True, keep_ratio=0.6, merge_threshold=0.9)
    out = shrink_placeholders(Output([a1, img, a2], ids), samp)
    assert out.input_ids == [TEXT, TEXT] + [AUDIO] * 6 + [TEXT] + [9] * 4 + [TEXT] + [AUDIO] * 3 + [TEXT]
    assert a1.offsets == [(2, 7)] and img.offsets == [(9, 12)] and a2.offsets == [(14, 16)]
    assert a1.model_specific_data[KEEP_KEY] == [6] and a2.model_specific_data[KEEP_KEY] == [3]
    assert a1.audio_feature_lens.tolist() == [10] and a2.audio_feature_lens.tolist() == [5]
    assert a1.hash == settings_hash(111, samp) != 111 and img.hash == 222
    assert settings_hash(111, SampConfig(enabled=True, keep_ratio=0.4)) != a1.hash
    assert settings_hash(111, SampConfig(enabled=True, keep_ratio=0.6, merge_threshold=0.8)) != a1.hash
    assert audio_token_counts([a1, img, a2]) == (6 + 3, 10 + 5)                     # what the request reports


def test_shrink_refuses_runs_that_disagree_with_the_mask():
    a = Item("audio", [(0, 9)], torch.zeros(1, 4, 80), hash=1, mask=_mask(80))          # mask says N=20
    with pytest.raises(ValueError, match="disagree"):
        shrink_placeholders(Output([a], [AUDIO] * 10), SampConfig(enabled=True))


def test_shrink_leaves_empty_runs_and_precomputed_embeddings():
    pre = Item("audio", [(0, 3)], None, hash=5)                                          # precomputed: no feature
    out = shrink_placeholders(Output([pre], [AUDIO] * 4 + [TEXT]), SampConfig(enabled=True, keep_ratio=0.5))
    assert out.input_ids == [AUDIO] * 4 + [TEXT] and pre.hash == 5 and KEEP_KEY not in pre.model_specific_data


# --- scheduler side ---------------------------------------------------------------------------------------

class TinyAudioModel(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import Qwen2AudioEncoderConfig
        from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
        torch.manual_seed(0)
        cfg = Qwen2AudioEncoderConfig(num_mel_bins=4, encoder_layers=2, encoder_attention_heads=2,
                                      encoder_ffn_dim=32, d_model=16, max_source_positions=40)
        self.audio_tower = Qwen2AudioEncoder(cfg).eval()
        self.multi_modal_projector = nn.Linear(16, 24)


def stock_get_audio_feature(self, items):
    """sglang 0.5.23 Qwen2AudioForConditionalGeneration.get_audio_feature, verbatim apart from the projector."""
    input_features = torch.cat([item.feature for item in items], dim=0).type(self.audio_tower.dtype)
    audio_embeds = self.audio_tower(input_features).last_hidden_state
    audio_embeds = self.multi_modal_projector(audio_embeds)
    audio_feature_lens = torch.cat([item.audio_feature_lens for item in items])
    new_embeds = []
    for i, d in zip(audio_feature_lens, audio_embeds):
        new_embeds.append(d[: i.item()])
    return torch.cat(new_embeds, dim=0)


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("transformers")
    return TinyAudioModel()


def _items(lens_keep):
    g = torch.Generator().manual_seed(1)
    items = []
    for n, k in lens_keep:
        it = Item("audio", [(0, (k or n) - 1)], torch.randn(1, 4, 80, generator=g), hash=n)
        it.audio_feature_lens = torch.tensor([n])
        if k is not None:
            it.model_specific_data[KEEP_KEY] = [k]
        items.append(it)
    return items


@pytest.mark.parametrize("threshold", [0.5, 0.95, 2.0])
def test_compress_matches_reference_per_clip(model, threshold):
    samp = SampConfig(enabled=True, keep_ratio=0.6, merge_threshold=threshold)
    lens_keep = [(20, 12), (9, samp.keep_count(9)), (3, samp.keep_count(3)), (7, None)]   # last: untouched
    items = _items(lens_keep)
    with torch.no_grad():
        got = compress_audio_feature(stock_get_audio_feature, model, items, samp)
        full = stock_get_audio_feature(model, items)
        # the last layer's input, recomputed independently: embeddings + all but the last layer
        feats = torch.cat([it.feature for it in items])
        h = nn.functional.gelu(model.audio_tower.conv2(nn.functional.gelu(model.audio_tower.conv1(feats))))
        h = h.permute(0, 2, 1) + model.audio_tower.embed_positions.weight
        h = model.audio_tower.layers[0](h, None)
        probs = layer_attention_probs(model.audio_tower.layers[-1], h)                 # [B, H, 40, 40]
    want, start = [], 0
    for c, (n, k) in enumerate(lens_keep):
        clip = full[start:start + n]
        start += n
        if k is None:
            want.append(clip)
            continue
        stats = pool_stats(attention_stats(probs[c][:, :2 * n, :2 * n]), pool=2, n_tokens=n)
        want.append(samp_compress_ref(clip, stats, keep=k, merge_threshold=threshold)[0])
    want = torch.cat(want)
    assert got.shape == (12 + samp.keep_count(9) + samp.keep_count(3) + 7, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compress_without_keep_counts_is_the_stock_output(model):
    items = _items([(20, None), (5, None)])
    with torch.no_grad():
        assert torch.equal(compress_audio_feature(stock_get_audio_feature, model, items, SampConfig(enabled=True)),
                           stock_get_audio_feature(model, items))


def test_clips_of_requests_with_their_own_keep_ratio_share_one_batch(model):
    """A batch mixing the server's keep ratio (0.6) and a request's own (0.3, recorded on its item by the
    tokenizer-side hook): each clip is compressed with its own K, exactly as in a batch of its own."""
    server = SampConfig(enabled=True, keep_ratio=0.6)
    own = SampConfig(enabled=True, keep_ratio=0.3)
    items = _items([(20, server.keep_count(20)), (20, own.keep_count(20))])
    items[1].model_specific_data[RATIO_KEY] = own.keep_ratio
    lines, done = _log_lines()
    try:
        with torch.no_grad():
            got = compress_audio_feature(stock_get_audio_feature, model, items, server)
            alone = compress_audio_feature(stock_get_audio_feature, model, items[1:], server)
    finally:
        done()
    assert lines == [] and got.shape == (12 + 6, 24)
    torch.testing.assert_close(got[12:], alone, rtol=1e-5, atol=1e-6)


def test_compress_refuses_settings_mismatch_without_failing_the_batch(model):
    items = _items([(20, 5)])                                    # keep_count(20) at 0.6 is 12, not 5
    lines, done = _log_lines()
    try:
        with torch.no_grad():
            got = compress_audio_feature(stock_get_audio_feature, model, items, SampConfig(enabled=True,
                                                                                           keep_ratio=0.6))
            full = stock_get_audio_feature(model, items)
    finally:
        done()
    assert torch.equal(got, full), "the uncompressed tokens go back (SGLang fits them to the placeholders)"
    assert len(lines) == 1 and "share --samp" in lines[0] and lines[0].endswith("used the uncompressed tokens")


def test_clip_lengths_that_do_not_line_up_fall_back_to_uncompressed(model):
    items = _items([(20, 12), (9, 5)])
    items[0].audio_feature_lens = torch.tensor([20, 9])         # stock's "every length on the first item"
    lines, done = _log_lines()
    try:
        with torch.no_grad():
            got = compress_audio_feature(stock_get_audio_feature, model, items[:1], SampConfig(enabled=True))
    finally:
        done()
    assert got.shape == (20, 24) and len(lines) == 1 and "do not line up" in lines[0]


def test_keep_one_only_gives_each_clip_its_own_length():
    ids = [AUDIO] * 10 + [TEXT] + [AUDIO] * 5
    a1 = Item("audio", [(0, 9)], torch.zeros(1, 4, 80), hash=111, mask=_mask(41))
    a2 = Item("audio", [(11, 15)], torch.zeros(1, 4, 80), hash=333, mask=_mask(21))
    a1.audio_feature_lens = torch.tensor([10, 5])                  # stock: every clip's length on the first item
    out = shrink_placeholders(Output([a1, a2], list(ids)), SampConfig(enabled=True, keep_ratio=1.0))
    assert out.input_ids == ids and a1.offsets == [(0, 9)] and a2.offsets == [(11, 15)]
    assert a1.audio_feature_lens.tolist() == [10] and a2.audio_feature_lens.tolist() == [5]
    assert (a1.hash, a2.hash) == (111, 333) and KEEP_KEY not in a1.model_specific_data


# --- containment: a clip whose Samp work fails falls back alone --------------------------------------------

def _log_lines():
    import logging  # noqa: PLC0415

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("sgl_slim").addHandler(handler)
    return lines, lambda: logging.getLogger("sgl_slim").removeHandler(handler)


def test_nonfinite_clip_falls_back_to_evenly_spaced_tokens_alone(model):
    samp = SampConfig(enabled=True, keep_ratio=0.6)
    items = _items([(20, 12), (9, samp.keep_count(9))])

    def nan_first_clip(self, items):
        out = stock_get_audio_feature(self, items)
        out[:20] = float("nan")                                    # the encoder "returned" NaN for clip 0
        return out

    lines, done = _log_lines()
    try:
        with torch.no_grad():
            got = compress_audio_feature(nan_first_clip, model, items, samp)
            good = compress_audio_feature(stock_get_audio_feature, model, _items([(20, 12), (9, samp.keep_count(9))]),
                                          samp)[12:]
    finally:
        done()
    assert got.shape == (12 + samp.keep_count(9), 24)
    assert bool(torch.isnan(got[:12]).all()), "clip 0: its 12 evenly spaced (NaN) tokens"
    torch.testing.assert_close(got[12:], good, rtol=0, atol=0)     # clip 1: compressed as if alone
    assert lines == ["sgl_slim audio: fallback (nonfinite): clip 0 (20 tokens, keep 12): ValueError: tokens must be "
                     "finite (the audio encoder returned NaN or inf); used an evenly spaced selection"]


def test_failed_statistics_fall_back_for_every_clip_with_one_line(model, monkeypatch):
    import sgl_slim.audio as audio  # noqa: PLC0415

    def broken(*args, **kwargs):
        raise RuntimeError("statistics exploded")

    monkeypatch.setattr(audio, "encoder_attention_stats", broken)
    samp = SampConfig(enabled=True, keep_ratio=0.6)
    items = _items([(20, 12), (9, samp.keep_count(9)), (7, None)])
    lines, done = _log_lines()
    try:
        with torch.no_grad():
            got = compress_audio_feature(stock_get_audio_feature, model, items, samp)
            full = stock_get_audio_feature(model, items)
    finally:
        done()
    k1 = samp.keep_count(9)
    want = torch.cat([full[:20][torch.arange(12) * 20 // 12], full[20:29][torch.arange(k1) * 9 // k1], full[29:]])
    assert torch.equal(got, want)
    assert lines == ["sgl_slim audio: fallback (error): encoder attention statistics of 2 clips: RuntimeError: "
                     "statistics exploded; used an evenly spaced selection"]


def test_shrink_keeps_zero_token_clips_aligned_with_the_features():
    """One item holding three clips, the middle one too short for a token (no placeholder run)."""
    ids = [AUDIO] * 10 + [TEXT] + [AUDIO] * 5
    mask = torch.cat([_mask(41), _mask(2), _mask(21)])                  # 10, 0, 5 tokens
    item = Item("audio", [(0, 9), (11, 15)], torch.zeros(3, 4, 80), hash=7, mask=mask)
    samp = SampConfig(enabled=True, keep_ratio=0.6)
    out = shrink_placeholders(Output([item], list(ids)), samp)
    assert item.audio_feature_lens.tolist() == [10, 0, 5]
    assert item.model_specific_data[KEEP_KEY] == [6, 0, 3]
    assert item.offsets == [(0, 5), (7, 9)] and len(out.input_ids) == 6 + 1 + 3


def test_compress_passes_zero_token_clips_through(model):
    g = torch.Generator().manual_seed(3)
    item = Item("audio", [(0, 11)], torch.randn(2, 4, 80, generator=g), hash=9)
    item.audio_feature_lens = torch.tensor([20, 0])
    item.model_specific_data[KEEP_KEY] = [12, 0]
    lines, done = _log_lines()
    try:
        with torch.no_grad():
            got = compress_audio_feature(stock_get_audio_feature, model, [item], SampConfig(enabled=True))
    finally:
        done()
    assert got.shape == (12, 24) and lines == []
