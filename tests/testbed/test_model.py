import json
import shutil

import torch

from sgl_slim.testbed.model import ROPE_THETA, TINY, ModelSpec, build_model, load_model
from sgl_slim.testbed.train import lr_at, weighted_loss


def test_default_spec_is_llama3_shaped_and_small(tokenizer):
    from sgl_slim.testbed.model import llama_config
    spec = ModelSpec()
    cfg = llama_config(spec, tokenizer)
    assert cfg.num_attention_heads // cfg.num_key_value_heads == 4 and cfg.head_dim == 128
    assert cfg.rope_parameters["rope_theta"] == ROPE_THETA == 500000.0
    assert cfg.hidden_act == "silu" and cfg.architectures == ["LlamaForCausalLM"]
    # parameters from the shapes: bf16 checkpoint must travel in <= ~48 MiB
    h, d, hq, hkv, f, v = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.intermediate_size, len(tokenizer)
    per_layer = h * hq * d * 2 + h * hkv * d * 2 + 3 * h * f + 2 * h
    params = spec.num_layers * per_layer + v * h + h
    assert params * 2 < 48 * 2**20, params


def test_checkpoint_roundtrip_is_a_standard_llama_dir(tiny_model_dir, tokenizer):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert (tiny_model_dir / "model.safetensors").is_file() and (tiny_model_dir / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert type(m).__name__ == "LlamaForCausalLM"
    assert len(AutoTokenizer.from_pretrained(str(tiny_model_dir))) == len(tokenizer)


def test_rope_scaled_copy_serves_the_same_weights_with_llama3_scaling(tiny_model_dir, tmp_path):
    # the copy that serves the 32K-trained model at 128K: the same weights (linked, not copied), Llama-3.1 RoPE
    # scaling x4 from 32K in the config, and so different rotary frequencies (the low ones slowed 4x) and logits
    from sgl_slim.testbed.model import with_rope_scaling
    before = (tiny_model_dir / "config.json").read_text()
    out = with_rope_scaling(tiny_model_dir, tmp_path / "x4", 4.0, original=4096)
    assert (tiny_model_dir / "config.json").read_text() == before, "the original checkpoint must not change"
    assert (out / "model.safetensors").is_symlink() and (out / "tokenizer.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"] == cfg["rope_scaling"]
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["rope_parameters"]["factor"] == 4.0
    assert cfg["max_position_embeddings"] == 2 * 4 * 4096
    plain, scaled = load_model(tiny_model_dir), load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), scaled.state_dict().values()))
    f0, f1 = plain.model.rotary_emb.inv_freq, scaled.model.rotary_emb.inv_freq
    assert torch.equal(f0[:4], f1[:4]) and torch.allclose(f1[-4:], f0[-4:] / 4), (f0, f1)
    ids = torch.randint(0, 100, (1, 300))
    assert not torch.allclose(plain(ids).logits, scaled(ids).logits)
    # the same directory made again for another checkpoint serves that one's files, not the first's
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    with_rope_scaling(other, out, 2.0, original=4096)
    assert (out / "model.safetensors").resolve() == (other / "model.safetensors").resolve()
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["factor"] == 2.0


def test_loss_falls_in_a_few_steps(tokenizer, stream):
    from sgl_slim.testbed.data import Pieces, training_batch
    model = build_model(TINY, tokenizer, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens, weights, _ = training_batch(stream, Pieces(tokenizer), seed=0, step=0, batch=4, length=256,
                                        mix={"lm": 0.5, "passkey": 0.5})
    losses = []
    for _ in range(16):
        loss = weighted_loss(model(input_ids=tokens).logits, tokens, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # initial loss ~ ln(vocab) = 7.6 per unit of weight: 1 for text samples, 1 + answer weight for passkey
    # ones (half each: ~11.4); sixteen steps on one batch must cut it by a fifth
    assert losses[0] > 10 and losses[-1] < 0.8 * losses[0], losses


def test_weighted_loss_matches_cross_entropy():
    logits = torch.randn(2, 5, 11)
    tokens = torch.randint(0, 11, (2, 5))
    w = torch.zeros(2, 5)
    w[:, 1:] = 0.25
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert torch.allclose(weighted_loss(logits, tokens, w), ref, atol=1e-6)


def test_lr_schedule_warms_up_and_decays_to_a_tenth():
    assert lr_at(0, 100, 1.0, 10) == 0.1
    assert lr_at(9, 100, 1.0, 10) == 1.0
    assert abs(lr_at(100, 100, 1.0, 10) - 0.1) < 1e-9
    assert lr_at(50, 100, 1.0, 10) < lr_at(20, 100, 1.0, 10)


def test_training_resumes_exactly(tmp_path):
    from sgl_slim.testbed.train import train
    full = train(tmp_path / "full", plan="tiny", save_every=100, progress=False, device="cpu")
    assert train(tmp_path / "split", plan="tiny", save_every=100, progress=False, device="cpu", stop_after=5) is None
    split = train(tmp_path / "split", plan="tiny", save_every=100, progress=False, device="cpu")
    assert full["steps_done"] == split["steps_done"] == 10
    a = load_model(tmp_path / "full" / "model", dtype=torch.float32).state_dict()
    b = load_model(tmp_path / "split" / "model", dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert log and all(r["loss"] > 0 for r in log)
