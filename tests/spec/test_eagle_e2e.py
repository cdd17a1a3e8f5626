"""End to end on the CPU: SGLang's EAGLE-3 worker with a trained sgl_slim draft is lossless (greedy output equal
to the same launcher without --eagle-draft, token for token, batch 1 and batch > 1), reports its acceptance per
request and in the log, and an incompatible draft stops the launcher with a message naming --eagle-draft.

The target and draft are built on first use and cached (sgl_slim.spec.target_lm.ensure_eagle_target,
sgl_slim.spec.train.ensure_eagle_draft): several minutes the first time on a 2-core machine.
"""

import concurrent.futures as cf
import subprocess
import sys

import pytest
import requests
import torch

from serving import ROOT, shared_server

pytestmark = pytest.mark.e2e

PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def __init__(self):\n        self.",
    "    for i in range(len(items)):\n        if ",
    "# Copyright (C) 2001 Python Software Foundation\n",
    "        raise ValueError(\"",
]
MAX_NEW = 48
COMMON = ["--dtype", "float32", "--max-total-tokens", "16384"]


@pytest.fixture(scope="module")
def models():
    from sgl_slim.spec.target_lm import ensure_eagle_target
    from sgl_slim.spec.train import ensure_eagle_draft

    draft = ensure_eagle_draft()
    return ensure_eagle_target(), draft


def generate(srv, texts):
    body = {"text": texts, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}}
    out = requests.post(f"{srv.base_url}/generate", json=body, timeout=900)
    out.raise_for_status()
    return out.json()


def run_all(srv):
    one_by_one = [generate(srv, p) for p in PROMPTS]                        # batch 1
    batched = generate(srv, PROMPTS)                                        # one request, batch 6
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:                         # concurrent clients
        concurrent = list(ex.map(lambda p: generate(srv, p), PROMPTS))
    return one_by_one, batched, concurrent


plain_server = shared_server(["--model-path", "{eagle_target}", *COMMON])
eagle_server = shared_server(["--model-path", "{eagle_target}", *COMMON, "--eagle-draft", "{eagle_draft}",
                              "--eagle-steps", "3", "--eagle-draft-tokens", "4"])


@pytest.fixture(scope="module")
def outputs(plain_server, eagle_server):
    return run_all(plain_server), run_all(eagle_server), eagle_server.log()


def test_greedy_output_is_lossless(outputs):
    plain, spec, _ = outputs
    for mode, a, b in zip(("batch 1", "batched", "concurrent"), plain, spec):
        for i, (x, y) in enumerate(zip(a, b)):
            assert x["output_ids"] == y["output_ids"], f"{mode}, prompt {i}: {x['output_ids']} != {y['output_ids']}"
            assert len(x["output_ids"]) == MAX_NEW


def test_acceptance_is_reported_per_request_and_logged(outputs):
    _, spec, log = outputs
    one_by_one = spec[0]
    for r in one_by_one:
        meta = r["meta_info"]
        assert meta["spec_verify_ct"] > 0
        assert meta["spec_num_proposed_drafts"] == 3 * meta["spec_verify_ct"]       # 3 draft tokens per verify
        assert 0 <= meta["spec_num_correct_drafts"] <= meta["spec_num_proposed_drafts"]
        # SGLang: accept length = completion tokens / verifies (prefill's token included)
        assert meta["spec_accept_length"] == pytest.approx(meta["completion_tokens"] / meta["spec_verify_ct"])
        # prefill token + one bonus per verify + accepted drafts (the last verify may overshoot max_new_tokens)
        assert meta["spec_verify_ct"] < meta["completion_tokens"] <= (
            1 + meta["spec_verify_ct"] + meta["spec_num_correct_drafts"])
    mean = sum(r["meta_info"]["spec_accept_length"] for r in one_by_one) / len(one_by_one)
    assert mean > 1.5, f"a trained draft should be accepted often; mean acceptance length {mean:.2f}"
    assert "accept len:" in log


def test_server_acceptance_matches_offline_simulation(models, outputs):
    """The served draft behaves like sgl_slim's own: SGLang loaded the exported weights as written."""
    from sgl_slim.spec.data import load_tokenizer
    from sgl_slim.spec.export import load_eagle3
    from sgl_slim.spec.metrics import simulate_chain
    from sgl_slim.spec.textlm import TextLM

    target_dir, draft_dir = models
    target = TextLM.from_pretrained(target_dir).eval()
    draft = load_eagle3(draft_dir, target.embed_tokens.weight).eval()
    tok = load_tokenizer(target_dir)
    _, spec, _ = outputs
    for prompt, r in zip(PROMPTS, spec[0]):
        ids = torch.tensor([tok.encode(prompt).ids])
        assert ids.shape[1] == r["meta_info"]["prompt_tokens"], "the server tokenized the prompt differently"
        stats = simulate_chain(target, draft, ids, MAX_NEW, steps=3)
        meta = r["meta_info"]
        assert meta["spec_verify_ct"] == stats.verifies, (prompt, meta, stats.lengths)
        assert meta["spec_num_correct_drafts"] == sum(stats.lengths) - stats.verifies, (prompt, meta, stats.lengths)
        assert meta["spec_correct_drafts_histogram"] == stats.histogram(4), (prompt, meta, stats.lengths)


def test_incompatible_draft_fails_at_startup(models, tmp_path):
    from sgl_slim.spec.draft import DraftConfig, Eagle3Draft
    from sgl_slim.spec.export import export_eagle3
    from sgl_slim.spec.textlm import TextConfig, TextLM

    target_dir, _ = models
    cfg = TextLM.from_pretrained(target_dir).cfg
    wrong = TextConfig(**{**cfg.__dict__, "hidden_size": 2 * cfg.hidden_size, "vocab_size": cfg.vocab_size + 7})
    draft = Eagle3Draft(DraftConfig.for_target(wrong, 64))
    draft.set_vocab(torch.arange(64))
    export_eagle3(draft, tmp_path / "wrong")
    proc = subprocess.run([sys.executable, "-m", "sgl_slim.launch", "--model-path", str(target_dir), *COMMON,
                           "--port", "34012", "--eagle-draft", str(tmp_path / "wrong")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0
    assert "--eagle-draft" in proc.stderr and "does not fit target" in proc.stderr, proc.stderr[-2000:]
    assert f"vocab_size {cfg.vocab_size + 7} != target's {cfg.vocab_size}" in proc.stderr
    assert f"target_hidden_size {2 * cfg.hidden_size} != target's hidden_size {cfg.hidden_size}" in proc.stderr
