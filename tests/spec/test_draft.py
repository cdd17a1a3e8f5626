"""EAGLE-3 draft: training-time test equals serving-time chain drafting, training lowers the loss, export format
and round trip, and the plain-torch target equals transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sgl_slim.spec.draft import DraftConfig, Eagle3Draft, default_aux_layer_ids, fuse_aux, ttt_loss
from sgl_slim.spec.export import export_eagle3, load_eagle3
from sgl_slim.spec.textlm import TextConfig, TextLM

VOCAB = 96


def tiny_target(seed: int = 0, layers: int = 4) -> TextLM:
    torch.manual_seed(seed)
    cfg = TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4,
                     num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=512, tie_word_embeddings=False)
    model = TextLM(cfg).eval()
    with torch.no_grad():             # sharper than the default init: greedy continuations vary
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def tiny_draft(target: TextLM, draft_vocab: int = 64, seed: int = 1) -> Eagle3Draft:
    torch.manual_seed(seed)
    draft = Eagle3Draft(DraftConfig.for_target(target.cfg, draft_vocab))
    draft.embed_tokens.weight.data.copy_(target.embed_tokens.weight)
    draft.set_vocab(torch.randperm(VOCAB)[:draft_vocab])
    return draft


def test_default_aux_layers_are_capturable():
    assert default_aux_layer_ids(4) == (0, 1, 2)
    assert default_aux_layer_ids(32) == (1, 15, 28)            # SGLang's own default for L >= 8
    for n in range(3, 12):
        ids = default_aux_layer_ids(n)
        assert len(ids) == 3 and max(ids) <= n - 2, (n, ids)
    with pytest.raises(ValueError, match=">= 3 layers"):
        default_aux_layer_ids(2)


def test_training_time_test_equals_chain_drafting():
    """Step i of forward_ttt at column c, fed the chain's own tokens, predicts what propose() predicts."""
    target = tiny_target()
    draft = tiny_draft(target)
    tokens = torch.randint(0, VOCAB, (2, 23))
    _, hiddens, _ = target(tokens)
    aux = fuse_aux(hiddens, draft.cfg.aux_layer_ids)
    k0, v0, g, logits = draft.step0(aux, tokens)
    for col in (0, 7, 15):
        proposal = draft.propose(k0, v0, g, logits, col, steps=4)          # [2, 4]
        fed = tokens.clone()
        fed[:, col + 2: col + 5] = proposal[:, :3]                         # step i input = x_{col+1+i}
        with torch.no_grad():
            out = draft.forward_ttt(aux, fed, steps=4)
        replay = torch.stack([draft.target_ids(o[:, col].argmax(-1)) for o in out], dim=1)
        assert torch.equal(replay, proposal), (col, replay, proposal)


def test_vocab_maps_round_trip():
    target = tiny_target()
    draft = tiny_draft(target)
    ids = torch.arange(draft.cfg.draft_vocab_size)
    back = draft.draft_ids(draft.target_ids(ids))
    assert torch.equal(back, ids)
    assert int(draft.t2d.sum()) == draft.cfg.draft_vocab_size
    outside = (~draft.t2d).nonzero()[0]
    assert draft.draft_ids(outside).item() == -100


def test_a_few_training_steps_reduce_the_loss():
    target = tiny_target()
    draft = tiny_draft(target, draft_vocab=VOCAB)
    prompts = torch.randint(0, VOCAB, (16, 8))
    seqs = torch.cat([prompts, target.generate_greedy(prompts, 24)], dim=1)
    with torch.no_grad():
        hidden, hiddens, _ = target(seqs)
        aux = fuse_aux(hiddens, draft.cfg.aux_layer_ids)
        labels = draft.draft_ids(target.logits(hidden).argmax(-1))
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss, accs = ttt_loss(draft.forward_ttt(aux, seqs, steps=3), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(accs) == 3
    assert losses[-1] < 0.8 * losses[0], losses


def test_ttt_loss_weights_steps_by_0_8_power():
    labels = torch.tensor([[1, 2, 3, 0, 1]])
    uniform = [torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)]               # CE = log 4 wherever valid
    loss, _ = ttt_loss(uniform, labels)
    assert loss.item() == pytest.approx((1 + 0.8) * torch.log(torch.tensor(4.0)).item(), rel=1e-6)


def test_export_has_sglang_eagle3_names_and_loads_back(tmp_path):
    target = tiny_target()
    draft = tiny_draft(target)
    export_eagle3(draft, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 64 and config["vocab_size"] == VOCAB
    assert config["target_hidden_size"] == 32 and config["num_hidden_layers"] == 1
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    tensors = load_file(tmp_path / "model.safetensors")
    expected = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} | {
        f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm",
                                         "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(tensors) == expected
    assert tensors["fc.weight"].shape == (32, 3 * 32)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (32, 2 * 32)   # q/k/v take 2 x hidden
    assert tensors["lm_head.weight"].shape == (64, 32)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    # SGLang: hot_token_id = d2t + arange (draft id -> target id)
    assert torch.equal(tensors["d2t"] + torch.arange(64), draft.target_ids(torch.arange(64)))

    again = load_eagle3(tmp_path, target.embed_tokens.weight)
    tokens = torch.randint(0, VOCAB, (1, 12))
    _, hiddens, _ = target(tokens)
    aux = fuse_aux(hiddens, draft.cfg.aux_layer_ids)
    assert torch.equal(draft.step0(aux, tokens)[3], again.step0(aux, tokens)[3])


def test_text_target_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = TextLM.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True)
        hidden, hiddens, _ = ours(ids)
        # fp32, same op order except SDPA vs eager attention: a few ulps
        torch.testing.assert_close(ours.logits(hidden), expected.logits, atol=1e-5, rtol=1e-5)
        for k in range(3):                      # hiddens[k] = output of layer k-1 (0 = embeddings)
            torch.testing.assert_close(hiddens[k], expected.hidden_states[k], atol=1e-5, rtol=1e-5)
        greedy = ours.generate_greedy(ids, 6)
        assert torch.equal(greedy, ref.generate(ids, max_new_tokens=6, do_sample=False)[:, 19:])

    ours.lm_head.weight.data.mul_(2.0)
    ours.save_text_weights(tmp_path)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["lm_head.weight"], ours.lm_head.weight)


@pytest.mark.parametrize("qkv_bias, tied, architecture", [(True, False, "Qwen2ForCausalLM"),
                                                          (False, True, "LlamaForCausalLM")])
def test_text_target_saves_a_new_checkpoint_that_transformers_loads(tmp_path, qkv_bias, tied, architecture):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                     num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=5000.0,
                     max_position_embeddings=256, tie_word_embeddings=tied)
    ours = TextLM(cfg, qkv_bias=qkv_bias).eval()
    with torch.no_grad():             # no zero biases or unit norms: every tensor must land where it belongs
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ours.save_pretrained(tmp_path, eos_token_id=3)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["eos_token_id"] == 3
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) is not tied
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(ref).__name__ == architecture
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        hidden, _, _ = ours(ids)
        torch.testing.assert_close(ref(ids).logits, ours.logits(hidden), atol=1e-5, rtol=1e-5)
    again = TextLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name

    ours.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())
