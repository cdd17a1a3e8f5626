"""KV-cache paths: the target's cached decode / verify equal its no-cache forward, the draft's incremental extend
equals its whole-sequence step0, and the real speculative decoding loop is lossless and counts acceptance like
the offline simulation."""

import pytest
import torch

from sgl_slim.spec.decode import speculative_greedy
from sgl_slim.spec.draft import fuse_aux
from sgl_slim.spec.metrics import simulate_chain
from sgl_slim.spec.train import draft_train_step, make_draft_optimizer

from test_draft import VOCAB, tiny_draft, tiny_target


def test_target_kv_cache_equals_no_cache_forward():
    """Prefill 9 tokens, decode 3 one at a time, then a 4-token verify chunk: same hiddens as one full pass."""
    target = tiny_target()
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        full, full_hiddens, _ = target(tokens)
        parts, layer_parts = [], []
        h, hs, past = target(tokens[:, :9])
        parts.append(h)
        layer_parts.append(hs)
        for pos in range(9, 12):
            h, hs, past = target(tokens[:, pos: pos + 1], past, start=pos)
            parts.append(h)
            layer_parts.append(hs)
        h, hs, past = target(tokens[:, 12:], past, start=12)
        parts.append(h)
        layer_parts.append(hs)
    assert past[0][0].shape[2] == 16
    # fp32: only summation order differs between the two paths (residual-stream values reach ~10, so ~1e-5
    # absolute rounding differences; the wrong-position test below moves them by > 1e-2)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
    for layer in range(len(full_hiddens)):
        torch.testing.assert_close(torch.cat([p[layer] for p in layer_parts], dim=1), full_hiddens[layer],
                                   rtol=1e-4, atol=1e-4)


def test_a_wrong_start_position_breaks_the_cache_equality():
    """The check above can fail: RoPE at the wrong position gives different hiddens."""
    target = tiny_target()
    tokens = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        full, _, _ = target(tokens)
        _, _, past = target(tokens[:, :9])
        wrong, _, _ = target(tokens[:, 9:], past, start=8)
    assert (wrong[:, 0] - full[:, 9]).abs().max() > 1e-2


def test_draft_extend_equals_step0():
    target = tiny_target()
    draft = tiny_draft(target)
    tokens = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        _, hiddens, _ = target(tokens)
    aux = fuse_aux(hiddens, draft.cfg.aux_layer_ids)
    k0, v0, g, logits = draft.step0(aux, tokens)                       # columns 0..19
    cache, gs, ls, start = None, [], [], 0
    for size in (7, 1, 1, 5, 6):
        cache, g_new, l_new = draft.extend(aux[:, start: start + size], tokens[:, start + 1: start + 1 + size],
                                           start, cache)
        gs.append(g_new)
        ls.append(l_new)
        start += size
    assert start == 20
    torch.testing.assert_close(cache[0], k0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[1], v0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(gs, dim=1), g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(ls, dim=1), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="starts at column 3"):
        draft.extend(aux[:, 3:4], tokens[:, 4:5], 3, cache)


def _trained_draft(target, steps: int = 40):
    torch.manual_seed(0)
    draft = tiny_draft(target, draft_vocab=VOCAB)
    prompts = torch.randint(0, VOCAB, (32, 8))
    seqs = torch.cat([prompts, target.generate_greedy(prompts, 24)], dim=1)
    with torch.no_grad():
        hidden, hiddens, _ = target(seqs)
        aux = fuse_aux(hiddens, draft.cfg.aux_layer_ids)
        labels = draft.draft_ids(target.logits(hidden).argmax(-1))
    params, opt, sched = make_draft_optimizer(draft, steps, lr=3e-2)
    losses = []
    for _ in range(steps):
        loss, _ = draft_train_step(draft, params, opt, sched, aux, seqs, labels, 3, with_acc=False)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    return draft.eval()


def test_speculative_loop_is_lossless_and_matches_the_simulation():
    target = tiny_target()
    draft = _trained_draft(target)
    prompts = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(5))
    accepted_any = 0
    for steps in (1, 3):
        for b in range(prompts.shape[0]):
            prompt = prompts[b: b + 1]
            out, stats = speculative_greedy(target, draft, prompt, 20, steps)
            assert torch.equal(out, target.generate_greedy(prompt, 20)), (steps, b)
            sim = simulate_chain(target, draft, prompt, 20, steps)
            assert stats.lengths == sim.lengths, (steps, b, stats.lengths, sim.lengths)
            accepted_any += sum(length > 1 for length in stats.lengths)
    assert accepted_any >= 5, "the trained draft should get some proposals accepted (else the test proves little)"
