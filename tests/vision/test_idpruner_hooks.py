"""IDPruner's SGLang hooks without a server: placeholder shrinking, per-image and per-frame-group selection,
position fix-up."""

import contextlib
import logging
import types

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalProcessorOutput  # noqa: E402

from sgl_slim.config import IDPrunerConfig  # noqa: E402
from sgl_slim.integration import idpruner_hooks as hooks  # noqa: E402
from sgl_slim.integration import metrics  # noqa: E402
from sgl_slim.vision import idpruner_select  # noqa: E402

PAD, TEXT = 151655, 7


def _item(start, n, seed, grid=None):
    grid = grid or (1, 2, 2 * n)                     # t, h, w in patches; merge 2 -> n tokens
    return MultimodalDataItem(modality=Modality.IMAGE, feature=torch.randn(4 * n, 8, generator=torch.Generator().manual_seed(seed)),
                              offsets=[(start, start + n - 1)],
                              model_specific_data={"image_grid_thw": torch.tensor([grid])})


def _output(runs, total):
    """input ids with image runs [(start, n)], positions = arange per row + a row tag, delta 0."""
    ids = [TEXT] * total
    items = []
    for i, (start, n) in enumerate(runs):
        ids[start:start + n] = [PAD] * n
        items.append(_item(start, n, seed=i))
    pos = torch.stack([torch.arange(total), torch.arange(total) + 1000, torch.arange(total) + 2000])
    return MultimodalProcessorOutput(input_ids=ids, mm_items=items, mrope_positions=pos,
                                     mrope_position_delta=torch.tensor([[5]]))


def test_shrink_two_images_keeps_text_positions_and_offsets():
    cfg = IDPrunerConfig(enabled=True, keep_ratio=0.25)
    out = _output([(2, 8), (12, 12)], total=30)
    old_pos = out.mrope_positions.clone()
    hooks.shrink_placeholders(out, cfg)
    k0, k1 = cfg.keep_count(8), cfg.keep_count(12)       # 2, 3
    assert (k0, k1) == (2, 3)
    assert len(out.input_ids) == 30 - (8 - k0) - (12 - k1)
    assert out.mm_items[0].offsets == [(2, 2 + k0 - 1)]
    assert out.mm_items[1].offsets == [(12 - 6, 12 - 6 + k1 - 1)]
    assert [i for i, t in enumerate(out.input_ids) if t == PAD] == [2, 3, 6, 7, 8]
    # text keeps its unpruned positions: the surviving text columns are the original text columns
    text_cols = [c for c in range(30) if not (2 <= c < 10 or 12 <= c < 24)]
    new_text = [i for i, t in enumerate(out.input_ids) if t == TEXT]
    assert torch.equal(out.mrope_positions[:, new_text], old_pos[:, text_cols])
    assert int(out.mrope_position_delta) == 5 + 6 + 9
    assert torch.equal(out.mm_items[1].model_specific_data[hooks.POS_KEY], old_pos[:, 12:24])
    assert out.mm_items[0].model_specific_data[hooks.N_KEY] == 8
    assert [it.model_specific_data[hooks.K_KEY] for it in out.mm_items] == [k0, k1]
    assert metrics.vision_token_counts(out.mm_items) == (k0 + k1, 8 + 12)     # what the request reports


VPAD = 151656
MERGE_MODEL = types.SimpleNamespace(visual=types.SimpleNamespace(spatial_merge_size=2),
                                    config=types.SimpleNamespace(hidden_size=12))


def _video_output(runs, total, groups, seed=0, image=None):
    """input ids with ONE video whose placeholders are the runs [(start, n)] (one run, or one per frame group as
    Qwen3-VL lays them out), grid (groups, 2, 2 * sum(n) / groups); optionally an image run (start, n) too."""
    ids = [TEXT] * total
    for start, n in runs:
        ids[start:start + n] = [VPAD] * n
    tokens = sum(n for _, n in runs)
    grid = torch.tensor([[groups, 2, 2 * tokens // groups]])
    video = MultimodalDataItem(modality=Modality.VIDEO, feature=torch.randn(4 * tokens, 8),
                               offsets=[(start, start + n - 1) for start, n in runs],
                               model_specific_data={"video_grid_thw": grid})
    items = [video]
    if image is not None:
        ids[image[0]:image[0] + image[1]] = [PAD] * image[1]
        items.append(_item(*image, seed=seed + 1))
    pos = torch.stack([torch.arange(total), torch.arange(total) + 1000, torch.arange(total) + 2000])
    return MultimodalProcessorOutput(input_ids=ids, mm_items=items, mrope_positions=pos,
                                     mrope_position_delta=torch.tensor([[0]]))


@pytest.mark.parametrize("runs,total", [([(2, 24)], 30), ([(2, 6), (10, 6), (18, 6), (26, 6)], 34)],
                         ids=["one-run", "run-per-group"])
def test_video_prunes_each_frame_group_with_its_positions(runs, total):
    cfg = IDPrunerConfig(enabled=True, keep_ratio=0.25, video_keep_ratio=0.5)
    hooks.HOOKS.cfg = cfg
    out = _video_output(runs, total, groups=4)
    old_pos = out.mrope_positions.clone()
    hooks.shrink_placeholders(out, cfg)
    video = out.mm_items[0]
    per = cfg.keep_count(6, video=True)                               # 3 of each group's 6 tokens
    assert per == 3
    md = video.model_specific_data
    assert (md[hooks.N_KEY], md[hooks.K_KEY], md[hooks.GROUPS_KEY]) == (24, 4 * per, 4)
    assert sum(e - s + 1 for s, e in video.offsets) == 4 * per
    assert len(out.input_ids) == total - 4 * (6 - per)
    assert torch.equal(md[hooks.POS_KEY], torch.cat([old_pos[:, s:s + n] for s, n in runs], dim=1))
    text = [c for c in range(total) if not any(s <= c < s + n for s, n in runs)]
    assert torch.equal(out.mrope_positions[:, [i for i, t in enumerate(out.input_ids) if t == TEXT]],
                       old_pos[:, text])                                   # text between and after keeps its own
    assert metrics.vision_token_counts(out.mm_items) == (12, 24)

    # scheduler: per group, MMR over that group's rows only; then positions over two prefill chunks
    vision = torch.randn(24, 12, generator=torch.Generator().manual_seed(3))
    got = hooks._get_video_feature_after(vision, MERGE_MODEL, out.mm_items)
    want = torch.cat([j * 6 + idpruner_select(vision[j * 6:(j + 1) * 6], None, per) for j in range(4)])
    assert torch.equal(md[hooks.KEEP_KEY], want)
    assert torch.equal(got, vision[want])
    cut = len(out.input_ids) // 2
    first = torch.zeros(3, cut, dtype=torch.long)
    second = torch.zeros(3, len(out.input_ids) - cut, dtype=torch.long)
    mm = types.SimpleNamespace(mm_items=out.mm_items)
    hooks._fix_chunk_positions(first, 0, 0, cut, mm)
    hooks._fix_chunk_positions(second, 0, cut, len(out.input_ids) - cut, mm)
    full = torch.cat([first, second], dim=1)
    slots = [c for s, e in video.offsets for c in range(s, e + 1)]
    assert torch.equal(full[:, slots], md[hooks.POS_KEY][:, want])


def test_video_and_image_ratios_apply_to_their_own_items_and_hashes():
    hashes = {}
    for video_ratio in (None, 0.5, 1.0):
        cfg = IDPrunerConfig(enabled=True, keep_ratio=0.25, video_keep_ratio=video_ratio)
        out = _video_output([(2, 24)], 40, groups=4, image=(30, 8))
        hooks.shrink_placeholders(out, cfg)
        video, image = out.mm_items
        assert image.model_specific_data[hooks.K_KEY] == cfg.keep_count(8) == 2
        if video_ratio == 1.0:                                             # kept whole: left as stock
            assert hooks.N_KEY not in video.model_specific_data and video.offsets == [(2, 25)]
        else:
            assert video.model_specific_data[hooks.K_KEY] == 4 * round(6 * (video_ratio or 0.25))
        hashes[video_ratio] = (video.hash, image.hash)
    assert hashes[None][1] == hashes[0.5][1]                            # the image's settings did not change
    assert hashes[None][0] != hashes[0.5][0]


@pytest.mark.parametrize("runs,groups", [([(2, 6), (10, 5)], 2), ([(2, 10)], 4), ([(2, 9), (12, 3)], 2)],
                         ids=["uneven-runs", "groups-do-not-divide", "run-cuts-a-group"])
def test_a_video_that_does_not_split_into_its_frame_groups_is_left_whole(runs, groups):
    out = _video_output(runs, 20, groups=groups)
    before = list(out.input_ids)
    hooks.shrink_placeholders(out, IDPrunerConfig(enabled=True, keep_ratio=0.25))
    assert out.input_ids == before and hooks.N_KEY not in out.mm_items[0].model_specific_data


def test_a_failed_group_selection_falls_back_per_group(monkeypatch):
    cfg = IDPrunerConfig(enabled=True, keep_ratio=0.5)
    hooks.HOOKS.cfg = cfg
    out = _video_output([(2, 24)], 30, groups=4)
    hooks.shrink_placeholders(out, cfg)
    # a selection that ignores its group's bounds (all from the first rows) is refused: every group must keep 3
    monkeypatch.setattr(hooks, "select_rows", lambda rows, k, cfg, feature_width=None: torch.arange(k) - 6)
    with slim_log() as lines:
        hooks._get_video_feature_after(torch.randn(24, 12), MERGE_MODEL, out.mm_items)
    keep = out.mm_items[0].model_specific_data[hooks.KEEP_KEY]
    assert torch.equal(keep, torch.tensor([0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]))   # evenly spaced per group
    assert len(lines) == 1 and "video of 24 tokens (keep 12)" in lines[0], lines


def test_hash_mixes_settings_and_is_deterministic():
    hashes = []
    for ratio in (0.25, 0.25, 0.5):
        out = _output([(1, 8)], total=12)
        hooks.shrink_placeholders(out, IDPrunerConfig(enabled=True, keep_ratio=ratio))
        hashes.append(out.mm_items[0].hash)
    assert hashes[0] == hashes[1] != hashes[2]
    stock = _output([(1, 8)], total=12).mm_items[0]
    stock.set_pad_value()
    assert stock.hash not in hashes


def test_keep_ratio_one_changes_nothing():
    out = _output([(2, 8), (12, 5)], total=20)
    before = (list(out.input_ids), out.mrope_positions.clone(), [it.offsets for it in out.mm_items])
    hooks.shrink_placeholders(out, IDPrunerConfig(enabled=True, keep_ratio=1.0))
    assert out.input_ids == before[0] and torch.equal(out.mrope_positions, before[1])
    assert [it.offsets for it in out.mm_items] == before[2]
    assert all(it.hash is None and hooks.N_KEY not in it.model_specific_data for it in out.mm_items)


def test_get_image_feature_selects_per_item_and_positions_follow():
    cfg = IDPrunerConfig(enabled=True, keep_ratio=0.5)
    hooks.HOOKS.cfg = cfg
    out = _output([(1, 6), (9, 10)], total=22)
    hooks.shrink_placeholders(out, cfg)
    items = out.mm_items
    gen = torch.Generator().manual_seed(0)
    vision = torch.randn(16, 12, generator=gen)                   # 6 + 10 rows
    model = types.SimpleNamespace(visual=types.SimpleNamespace(spatial_merge_size=2),
                                  config=types.SimpleNamespace(text_config=types.SimpleNamespace(hidden_size=12)))
    got = hooks._get_image_feature_after(vision, model, items)
    k0, k1 = cfg.keep_count(6), cfg.keep_count(10)
    keep0, keep1 = idpruner_select(vision[:6], None, k0), idpruner_select(vision[6:], None, k1)
    assert torch.equal(got, torch.cat([vision[:6][keep0], vision[6:][keep1]]))
    assert torch.equal(items[1].model_specific_data[hooks.KEEP_KEY], keep1)

    # positions: a batch of [another request of 4 tokens, this request chunked at 7 tokens]
    total = len(out.input_ids)
    first = torch.zeros(3, 4 + 7, dtype=torch.long)
    second = torch.zeros(3, total - 7, dtype=torch.long)
    mm = types.SimpleNamespace(mm_items=items)
    hooks._fix_chunk_positions(first, 4, 0, 7, mm)
    hooks._fix_chunk_positions(second, 0, 7, total - 7, mm)
    full = torch.cat([first[:, 4:], second], dim=1)
    for item, keep in zip(items, (keep0, keep1)):
        (s, e), = item.offsets
        assert torch.equal(full[:, s:e + 1], item.model_specific_data[hooks.POS_KEY][:, keep])
    assert torch.equal(first[:, :4], torch.zeros(3, 4, dtype=torch.long)), "other request's positions touched"


def test_cache_hit_item_gets_keep_from_the_store():
    cfg = IDPrunerConfig(enabled=True, keep_ratio=0.5)
    hooks.HOOKS.cfg = cfg
    a, b = _output([(0, 6)], total=8), _output([(2, 6)], total=10)   # same image, another offset
    for o in (a, b):
        hooks.shrink_placeholders(o, cfg)
    assert a.mm_items[0].hash == b.mm_items[0].hash
    model = types.SimpleNamespace(visual=types.SimpleNamespace(spatial_merge_size=2),
                                  config=types.SimpleNamespace(hidden_size=5))
    rows = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    hooks._get_image_feature_after(rows, model, a.mm_items)
    pos = torch.zeros(3, len(b.input_ids), dtype=torch.long)
    hooks._fix_chunk_positions(pos, 0, 0, len(b.input_ids), types.SimpleNamespace(mm_items=b.mm_items))
    keep = a.mm_items[0].model_specific_data[hooks.KEEP_KEY]
    assert torch.equal(pos[:, 2:5], b.mm_items[0].model_specific_data[hooks.POS_KEY][:, keep])


@contextlib.contextmanager
def slim_log():
    """The messages sgl_slim logs inside the block (its logger may not propagate to the root logger)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("sgl_slim")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_size_mismatch_keeps_the_unpruned_rows():
    cfg = IDPrunerConfig(enabled=True, keep_ratio=0.5)
    hooks.HOOKS.cfg = cfg
    out = _output([(0, 6)], total=8)
    hooks.shrink_placeholders(out, cfg)
    model = types.SimpleNamespace(visual=types.SimpleNamespace(spatial_merge_size=2), config=types.SimpleNamespace())
    with pytest.raises(RuntimeError, match="rows for images"):
        hooks.prune_rows(torch.randn(7, 4), model, out.mm_items)
    # In the scheduler the same failure must not escape: the hook keeps the original rows (AFTER: None).
    with slim_log() as lines:
        assert hooks._get_image_feature_after(torch.randn(7, 4), model, out.mm_items) is None
    assert lines == ["sgl_slim vision: fallback (error): 1 images: RuntimeError: idpruner: vision tower returned 7 "
                     "rows for images of [6] tokens (merge 2); used the unpruned rows"]


def test_hooked_symbols_exist():
    import importlib
    for path in hooks.HOOKED_SYMBOLS:
        module, _, attr = path.rpartition(".")
        obj = None
        parts = module.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                for p in parts[i:]:
                    obj = getattr(obj, p)
                break
            except ModuleNotFoundError:
                continue
        assert obj is not None and hasattr(obj, attr), f"{path} missing in this sglang"
