"""--eagle-draft -> SGLang's --speculative-* flags, and the startup check that a draft fits its target."""

import argparse
import json

import pytest
import torch

from sgl_slim.config import ConfigError, EagleConfig, SlimConfig
from sgl_slim.integration import eagle
from sgl_slim.spec.draft import DraftConfig, Eagle3Draft
from sgl_slim.spec.export import export_eagle3
from sgl_slim.spec.textlm import TextConfig

TARGET = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
          "text_config": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                          "rope_parameters": {"rope_theta": 1e6, "mrope_section": [1, 1, 2]}}}


def make_pair(tmp_path, *, target=TARGET, draft_vocab=16, draft_hidden=32, draft_full_vocab=128, layers=None):
    tdir, ddir = tmp_path / "target", tmp_path / "draft"
    tdir.mkdir()
    (tdir / "config.json").write_text(json.dumps(target))
    tcfg = TextConfig.from_hf(TARGET)
    cfg = DraftConfig.for_target(tcfg, draft_vocab, layers)
    cfg = DraftConfig(**{**cfg.__dict__, "hidden_size": draft_hidden, "target_hidden_size": draft_hidden,
                         "vocab_size": draft_full_vocab})
    draft = Eagle3Draft(cfg)
    draft.set_vocab(torch.arange(draft_vocab))
    export_eagle3(draft, ddir)
    return tdir, ddir


def server_args(tdir, **given):
    ns = argparse.Namespace(model_path=str(tdir), speculative_algorithm=None, speculative_draft_model_path=None,
                            speculative_num_steps=None, speculative_eagle_topk=None,
                            speculative_num_draft_tokens=None)
    for k, v in given.items():
        setattr(ns, k, v)
    return ns


def cfg_for(ddir, steps=3, tokens=4):
    return SlimConfig(eagle=EagleConfig(draft=str(ddir), steps=steps, draft_tokens=tokens)).validate()


@pytest.mark.parametrize("cpu", [True, False])
def test_flags_map_to_sglang_eagle3(tmp_path, cpu):
    tdir, ddir = make_pair(tmp_path)
    args = server_args(tdir)
    eagle.adjust_server_args(cfg_for(ddir, 5, 6), args, cpu=cpu)
    assert (args.speculative_algorithm, args.speculative_draft_model_path, args.speculative_num_steps,
            args.speculative_eagle_topk, args.speculative_num_draft_tokens) == ("EAGLE3", str(ddir), 5, 1, 6)


def test_disabled_changes_nothing(tmp_path):
    args = server_args(tmp_path)
    eagle.adjust_server_args(SlimConfig(), args, cpu=True)
    assert args.speculative_algorithm is None


def test_conflicting_user_flag_is_an_error(tmp_path):
    tdir, ddir = make_pair(tmp_path)
    with pytest.raises(ConfigError, match=r"--eagle-draft: conflicts with --speculative-eagle-topk 4"):
        eagle.adjust_server_args(cfg_for(ddir), server_args(tdir, speculative_eagle_topk=4), cpu=True)
    same = server_args(tdir, speculative_algorithm="EAGLE3", speculative_num_steps=3)
    eagle.adjust_server_args(cfg_for(ddir), same, cpu=True)          # equal values are fine
    assert same.speculative_num_draft_tokens == 4


def test_draft_tokens_must_be_steps_plus_one(tmp_path):
    tdir, ddir = make_pair(tmp_path)
    with pytest.raises(ConfigError, match="--eagle-draft-tokens: .*use --eagle-draft-tokens 4"):
        eagle.adjust_server_args(cfg_for(ddir, 3, 6), server_args(tdir), cpu=False)


def test_fitting_draft_passes(tmp_path):
    tdir, ddir = make_pair(tmp_path)
    eagle.check_draft_fits(ddir, tdir)


@pytest.mark.parametrize("kind, message", [
    ("vocab", r"vocab_size 100 != target's 128"),
    ("hidden", r"target_hidden_size 48 != target's hidden_size 32"),
    ("layers", r"eagle_aux_hidden_state_layer_ids \[3\] outside 0..2"),
])
def test_incompatible_draft_is_named(tmp_path, kind, message):
    kw = {"vocab": dict(draft_full_vocab=100), "hidden": dict(draft_hidden=48), "layers": dict(layers=(0, 1, 3))}
    tdir, ddir = make_pair(tmp_path, **kw[kind])
    with pytest.raises(ConfigError, match="--eagle-draft: draft .* does not fit target .*" + message):
        eagle.adjust_server_args(cfg_for(ddir), server_args(tdir), cpu=True)


def test_not_an_eagle3_checkpoint(tmp_path):
    tdir, ddir = make_pair(tmp_path)
    (ddir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="is not an EAGLE-3 draft"):
        eagle.check_draft_fits(ddir, tdir)


def test_draft_tokens_default_to_steps_plus_one(tmp_path):
    tdir, ddir = make_pair(tmp_path)
    args = server_args(tdir)
    eagle.adjust_server_args(SlimConfig(eagle=EagleConfig(draft=str(ddir), steps=5)).validate(), args, cpu=True)
    assert (args.speculative_num_steps, args.speculative_num_draft_tokens) == (5, 6)
