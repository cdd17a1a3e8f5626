"""The random-weight Qwen2.5-VL builder: the tiny shape loads in transformers with every weight present, its
checkpoint keys are the ones ``save_pretrained`` writes, and the 7B shape has the real model's sizes."""

import json

import pytest
import torch

from sgl_slim.random_vl import SHAPES, build_random_vl, checkpoint_name


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_random_vl(tmp_path_factory.mktemp("vl") / "tiny", "tiny", device="cpu")


def test_tiny_loads_in_transformers_with_every_weight(tiny_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not any(info.values()), f"keys not matched on load: {info}"
    p = dict(model.named_parameters())
    norm = p["model.language_model.layers.0.input_layernorm.weight"]
    assert torch.equal(norm, torch.ones_like(norm)), "RMSNorm weights must be 1"
    q = p["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert 0.015 < q.std().item() < 0.025, f"projection std {q.std().item()} (want ~0.02)"
    assert torch.count_nonzero(p["model.language_model.layers.0.self_attn.q_proj.bias"]) == 0


def test_tiny_keys_are_save_pretrained_keys(tiny_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    saved = set()
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            saved |= set(s.keys())
    ours = set(json.loads((tiny_dir / "model.safetensors.index.json").read_text())["weight_map"])
    assert ours == saved, f"only ours: {sorted(ours - saved)[:5]}; only save_pretrained: {sorted(saved - ours)[:5]}"
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["vision_config"]["in_chans"] == 3 and cfg["dtype"] == "float32"
    assert (tiny_dir / "processor_config.json").is_file() and (tiny_dir / "tokenizer.json").is_file()


def test_shards_and_their_index_load(tmp_path, monkeypatch):
    from transformers import Qwen2_5_VLForConditionalGeneration

    import sgl_slim.random_vl as random_vl

    monkeypatch.setattr(random_vl, "SHARD_BYTES", 256 << 10)
    out = random_vl.build_random_vl(tmp_path / "sharded", "tiny", device="cpu")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(files) > 1 and set(weight_map.values()) == set(files), files
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), f"keys not matched on load: {info}"


def test_7b_shape_matches_qwen25_vl_7b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = SHAPES["7b"]
    cfg = Qwen2_5_VLConfig(text_config=dict(spec["text"], vocab_size=2048), vision_config=dict(spec["vision"]))
    with torch.device("meta"):
        sd = Qwen2_5_VLForConditionalGeneration(cfg).state_dict()
    names = {checkpoint_name(k): v.shape for k, v in sd.items()}
    assert names["model.layers.27.self_attn.q_proj.weight"] == (3584, 3584)
    assert names["model.layers.27.self_attn.k_proj.weight"] == (512, 3584)        # 4 KV heads x 128
    assert names["model.layers.27.mlp.gate_proj.weight"] == (18944, 3584)
    assert names["visual.blocks.31.attn.qkv.weight"] == (3 * 1280, 1280)
    assert names["visual.merger.mlp.2.weight"][0] == 3584                           # out hidden = LM hidden
    assert "model.layers.28.input_layernorm.weight" not in names
    assert "visual.blocks.32.norm1.weight" not in names
    vision = sum(v.numel() for k, v in names.items() if k.startswith("visual."))
    lm = sum(v.numel() for k, v in names.items() if not k.startswith("visual."))
    assert 0.67e9 < vision < 0.68e9, vision
    # 7.07B with the real 152,064-token vocabulary's embedding and head; 6.54B with the demo's 2,048
    assert 6.5e9 < lm < 6.6e9, lm
    assert sum(spec["text"]["rope_parameters"]["mrope_section"]) == 3584 // 28 // 2


def test_tiny_audio_loads_in_transformers_and_its_keys_are_sglangs(tmp_path):
    from transformers import Qwen2AudioForConditionalGeneration

    from sgl_slim.random_vl import AUDIO_SHAPES, build_random_audio

    d = build_random_audio(tmp_path / "audio", "tiny", device="cpu")
    model, info = Qwen2AudioForConditionalGeneration.from_pretrained(d, output_loading_info=True)
    assert not any(info.values()), f"keys not matched on load: {info}"
    keys = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
    # SGLang's Qwen2-Audio loader reads the original checkpoint layout
    assert {k.split(".")[0] for k in keys} == {"audio_tower", "multi_modal_projector", "language_model"}, keys
    assert "language_model.lm_head.weight" in keys and "language_model.model.norm.weight" in keys
    p = dict(model.named_parameters())
    assert torch.equal(p["model.language_model.norm.weight"], torch.ones(AUDIO_SHAPES["tiny"]["text"]["hidden_size"]))
    assert (d / "processor_config.json").is_file() and (d / "tokenizer.json").is_file()


def test_7b_audio_shape_is_qwen2_audio_7b():
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    from sgl_slim.random_vl import AUDIO_SHAPES

    spec = AUDIO_SHAPES["7b"]
    config = Qwen2AudioConfig(audio_config=spec["audio"], text_config=dict(spec["text"], model_type="qwen2",
                                                                           vocab_size=2048))
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2AudioForConditionalGeneration(config).parameters())
    # Qwen2-Audio-7B: 8.40B with its 156,032-token vocabulary; the two vocab-sized matrices account for the rest
    assert n + 2 * (156032 - 2048) * 4096 == pytest.approx(8.40e9, rel=0.01), n
