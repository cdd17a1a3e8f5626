"""The evaluation's scoring on stub models whose answers are known."""
import math
from types import SimpleNamespace

import torch

from sgl_slim.testbed.data import Pieces, eval_samples
from sgl_slim.testbed.eval import answer_correct, heldout_loss, score_retrieval

V = 2048


class StubLM(torch.nn.Module):
    """hidden = one-hot of the token the stub wants to predict next; lm_head = identity.
    ``oracle`` predicts ids[i+1] (cheating with the input it is scored on), ``wrong_last`` the same except the
    last answer token, otherwise token 0 everywhere."""

    def __init__(self, mode, samples=None):
        super().__init__()
        self.mode, self.samples = mode, samples or {}
        self.config = SimpleNamespace(vocab_size=V)
        self.lm_head = torch.nn.Identity()
        self.model = self._backbone

    def _next(self, ids):
        nxt = torch.zeros_like(ids)
        if self.mode in ("oracle", "wrong_last"):
            nxt[:-1] = ids[1:]
            if self.mode == "wrong_last":
                s, e = self.samples[tuple(ids.tolist()[:16])]
                nxt[e - 2] = (ids[e - 1] + 1) % V
        return nxt

    def _backbone(self, input_ids):
        h = torch.nn.functional.one_hot(self._next(input_ids[0]), V).float()[None] * 10
        return SimpleNamespace(last_hidden_state=h)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self._backbone(input_ids).last_hidden_state)


def test_answer_correct_needs_every_token():
    ids = torch.tensor([5, 6, 7, 8, 9])
    logits = torch.nn.functional.one_hot(torch.tensor([6, 7, 8, 9, 0]), 10).float()
    assert answer_correct(logits, ids, [(2, 5)]) == [True]
    logits[3] = torch.nn.functional.one_hot(torch.tensor(1), 10).float()        # predicts 1 instead of 9
    assert answer_correct(logits, ids, [(2, 4), (2, 5)]) == [True, False]


def test_retrieval_scoring_on_stub_models(tokenizer, stream):
    samples = eval_samples(stream, Pieces(tokenizer), kind="passkey", length=512, depths=[0.0, 1.0], per_depth=3,
                           seed=2)
    assert score_retrieval(StubLM("oracle"), samples, "cpu") == [True] * 6
    assert score_retrieval(StubLM("zeros"), samples, "cpu") == [False] * 6
    spans = {tuple(s.ids[:16]): s.answers[0] for s in samples}
    assert score_retrieval(StubLM("wrong_last", spans), samples, "cpu") == [False] * 6


def test_heldout_loss_of_a_perfect_and_a_uniform_predictor():
    windows = torch.randint(1, V, (2, 64))
    # the right token has logit 10, the V - 1 others 0 -> CE = log(1 + (V - 1) e^-10)
    assert math.isclose(heldout_loss(StubLM("oracle"), windows, "cpu"), math.log1p((V - 1) * math.exp(-10)),
                        rel_tol=1e-4)
    uniform = StubLM("zeros")
    # logits 10 on token 0, 0 elsewhere; labels never 0 -> CE = log(e^10 + V - 1)
    assert math.isclose(heldout_loss(uniform, windows, "cpu"), math.log(math.exp(10) + V - 1), rel_tol=1e-4)


def test_evaluate_rows_for_a_real_tiny_model(tiny_model, tokenizer, stream):
    from sgl_slim.testbed.eval import evaluate
    rows = evaluate(tiny_model, tokenizer, ["dense", "s2o:v2:0"], lengths=[256], depths=[0.0, 1.0], per_depth=2,
                    loss_windows=1, device="cpu", stream=stream, log=lambda r: None, block_size=32, segment_size=64)
    summ = {r["method"]: r for r in rows if "heldout_loss" in r}
    assert set(summ) == {"dense", "s2o:v2:0"}
    # tau 0 is dense attention: the same loss and the same answers
    assert math.isclose(summ["dense"]["heldout_loss"], summ["s2o:v2:0"]["heldout_loss"], rel_tol=1e-4)
    for task in ("passkey", "kv"):
        assert summ["dense"][f"{task}_accuracy"] == summ["s2o:v2:0"][f"{task}_accuracy"]
    grid = [r for r in rows if r.get("task") == "kv" and r["method"] == "dense"]
    assert [r["depth"] for r in grid] == [0.0, 1.0] and all(r["n"] == 2 for r in grid)
    late = evaluate(tiny_model, tokenizer, ["dense"], lengths=[256], per_depth=1, loss_windows=0, device="cpu",
                    stream=stream, log=lambda r: None, time_budget=-1)
    assert late == [{"bench": "testbed_eval", "method": "dense", "length": 256, "skipped": "time budget"}]
