"""The acceptance-length statistic, checked against hand-built cases."""

import pytest
import torch

from sgl_slim.spec.metrics import AcceptanceStats, accepted_prefix, server_accept_length, simulate_chain


def test_accepted_prefix():
    assert accepted_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert accepted_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert accepted_prefix([9, 2, 3], [1, 2, 3]) == 0      # a later match after a miss does not count
    assert accepted_prefix([], [1]) == 0


def test_stats_mean_and_histogram():
    stats = AcceptanceStats()
    for n in (3, 1, 4, 4, 2):
        stats.add(n)
    assert stats.mean_length == pytest.approx(14 / 5)
    assert stats.mean_accepted == pytest.approx(14 / 5 - 1)
    assert stats.histogram(4) == [1, 1, 1, 2]
    with pytest.raises(ValueError, match=r"outside 1..3"):
        stats.histogram(3)
    assert server_accept_length(48, 12) == 4.0


class ScriptedTarget:
    """Greedy continuation 10, 11, 12, ... whatever the prompt."""

    def generate_greedy(self, prompts, n):
        return torch.arange(10, 10 + n)[None].expand(prompts.shape[0], -1)

    def __call__(self, seqs):
        return None, [torch.zeros(*seqs.shape, 1)] * 2, None


class ScriptedDraft:
    """Proposes a fixed chain per verify column."""

    class cfg:
        aux_layer_ids = (0,)

    def __init__(self, script):
        self.script = script
        self.cols = []

    def step0(self, aux, seqs):
        empty = torch.zeros(seqs.shape[0], 1)
        return empty, empty, empty, empty

    def propose(self, k0, v0, g, logits, col, steps):
        self.cols.append(col)
        return torch.tensor([self.script[col]])


def test_simulated_chain_counts_a_hand_built_case():
    # prompt of 2 tokens; truth from position 2 on: 10, 11, 12, 13, 14, 15, 16, 17 (6 new + 2 spare)
    # verify 1: 3 committed, draft [11, 12] == truth at 3, 4 -> 2 accepted + bonus = 3; committed 6
    # verify 2: draft [99, 15]: miss at once -> 1;                                         committed 7
    # verify 3: draft [15, 99] vs truth [15, 16] -> 1 accepted + bonus = 2;                committed 9 >= 8: done
    draft = ScriptedDraft({1: [11, 12], 4: [99, 15], 5: [15, 99]})
    stats = simulate_chain(ScriptedTarget(), draft, torch.zeros(1, 2, dtype=torch.long), max_new_tokens=6, steps=2)
    assert draft.cols == [1, 4, 5]
    assert stats.lengths == [3, 1, 2]
    assert stats.mean_length == 2.0 and stats.histogram(3) == [1, 1, 1]
