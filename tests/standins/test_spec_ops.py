"""The pure-torch speculative ops: hand-built chain cases (plain expectations), and random chain/tree inputs
compared with SGLang's own Triton kernels run under TRITON_INTERPRET=1 (in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgl_slim.standins import spec_ops

HERE = Path(__file__).resolve().parent


def chain_tree_inputs(seq_lens, steps, mode):
    bs, n = len(seq_lens), steps + 1
    seq = torch.tensor(seq_lens, dtype=torch.long)
    mask_len = n * n * bs if mode == spec_ops.QLEN_ONLY else sum(seq_lens) * n + n * n * bs
    return dict(
        parent_list=torch.arange(-1, steps - 1, dtype=torch.long).repeat(bs, 1),     # SGLang's topk=1 prealloc
        selected_index=torch.arange(steps, dtype=torch.long).repeat(bs, 1),
        verified_seq_len=seq, tree_mask=torch.ones(mask_len, dtype=torch.bool),
        positions=torch.empty(bs * n, dtype=torch.long),
        retrive_index=torch.full((bs, n), -1, dtype=torch.long),
        retrive_next_token=torch.full((bs, n), -1, dtype=torch.long),
        retrive_next_sibling=torch.full((bs, n), -1, dtype=torch.long),
        topk=1, depth=steps, draft_token_num=n, tree_mask_mode=mode)


def run_tree(c):
    spec_ops.build_tree_kernel_efficient(*[c[k] for k in (
        "parent_list", "selected_index", "verified_seq_len", "tree_mask", "positions", "retrive_index",
        "retrive_next_token", "retrive_next_sibling", "topk", "depth", "draft_token_num", "tree_mask_mode")])


def run_verify(c):
    spec_ops.verify_tree_greedy(*[c[k] for k in (
        "predicts", "accept_index", "accept_token_num", "candidates", "retrive_index", "retrive_next_token",
        "retrive_next_sibling", "target_predict")])


def test_chain_tree_is_a_causal_chain():
    c = chain_tree_inputs([5, 9], steps=3, mode=spec_ops.QLEN_ONLY)
    run_tree(c)
    n = 4
    assert c["retrive_index"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert c["retrive_next_token"].tolist() == [[1, 2, 3, -1]] * 2
    assert (c["retrive_next_sibling"] == -1).all()
    assert c["positions"].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(c["tree_mask"].view(2, n, n), causal.expand(2, n, n))


def test_chain_full_mask_layout():
    c = chain_tree_inputs([3, 2], steps=2, mode=spec_ops.FULL_MASK)
    run_tree(c)
    n = 3
    first = c["tree_mask"][: 3 * (3 + n)].view(n, 3 + n)               # request 0: rows of seq_len + n columns
    second = c["tree_mask"][3 * (3 + n):].view(n, 2 + n)
    for block, seq in ((first, 3), (second, 2)):
        assert block[:, :seq].all()
        assert torch.equal(block[:, seq:], torch.ones(n, n, dtype=torch.bool).tril())


@pytest.mark.parametrize("accepted", [0, 1, 3])
def test_verify_greedy_accepts_the_matching_prefix(accepted):
    n = 4
    target = torch.tensor([[11, 12, 13, 14]])            # the target's token after node j
    drafts = [11, 12, 13]
    if accepted < 3:
        drafts[accepted] = 99
    c = chain_tree_inputs([7], steps=3, mode=spec_ops.QLEN_ONLY)
    run_tree(c)
    v = dict(predicts=torch.full((n,), -5, dtype=torch.long), accept_index=torch.full((1, n), -1, dtype=torch.long),
             accept_token_num=torch.zeros(1, dtype=torch.long), candidates=torch.tensor([[10] + drafts]),
             retrive_index=c["retrive_index"], retrive_next_token=c["retrive_next_token"],
             retrive_next_sibling=c["retrive_next_sibling"], target_predict=target)
    run_verify(v)
    assert v["accept_token_num"].item() == accepted
    assert v["accept_index"][0, : accepted + 1].tolist() == list(range(accepted + 1))
    assert (v["accept_index"][0, accepted + 1:] == -1).all()
    assert v["predicts"][: accepted + 1].tolist() == target[0, : accepted + 1].tolist()   # bonus = target's
    assert (v["predicts"][accepted + 1:] == -5).all()


def test_small_ops_plain_meaning():
    req_to_token = torch.arange(40, dtype=torch.int32).view(4, 10) + 100
    out = torch.zeros(6, dtype=torch.long)
    spec_ops.assign_draft_cache_locs_contiguous(torch.tensor([2, 0]), req_to_token, torch.tensor([3, 7]), out,
                                               10, 1, 3)
    assert out.tolist() == [123, 124, 125, 107, 108, 109]
    out = torch.zeros(5, dtype=torch.long)
    spec_ops.assign_extend_cache_locs(torch.tensor([1, 3]), req_to_token, torch.tensor([2, 8]),
                                     torch.tensor([5, 10]), out, 10)
    assert out.tolist() == [112, 113, 114, 138, 139]
    bonus = torch.zeros(2, dtype=torch.long)
    spec_ops.fill_bonus_tokens(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([2, 3]), bonus, 3)
    assert bonus.tolist() == [2, 6]
    acc = torch.zeros(3, dtype=torch.long)
    spec_ops.fill_accept_out_cache_loc(torch.tensor([0, -1, 2, 3, -1]), torch.tensor([50, 51, 52, 53, 54]), acc)
    assert acc.tolist() == [50, 52, 53]


def test_ops_register_under_sgl_kernel():
    spec_ops.register()
    spec_ops.register()                                   # idempotent
    for name in spec_ops.OP_NAMES:
        assert hasattr(torch.ops.sgl_kernel, name), name
    out = torch.zeros(3, dtype=torch.long)
    torch.ops.sgl_kernel.assign_draft_cache_locs_contiguous_cpu(
        torch.tensor([0]), torch.arange(10).view(1, 10), torch.tensor([4]), out, 10, 1, 3)
    assert out.tolist() == [4, 5, 6]


def _random_cases(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = {}
    for mode in (spec_ops.FULL_MASK, spec_ops.QLEN_ONLY):
        cases[f"chain{mode}"] = dict(chain_tree_inputs([6, 3, 11], steps=4, mode=mode), kind="tree")
        # tree drafts: topk 2, 3 steps, 6 verified tokens; parents/selection drawn within range
        bs, topk, depth, n = 3, 2, 3, 6
        width = topk * (depth - 1) + 1
        seq = torch.randint(2, 9, (bs,), generator=g)
        sel = torch.stack([torch.randperm(topk * width, generator=g)[: n - 1].sort().values for _ in range(bs)])
        par = torch.cat([torch.full((bs, 1), -1), torch.randint(0, topk * width, (bs, width - 1), generator=g)], 1)
        mask_len = n * n * bs if mode == spec_ops.QLEN_ONLY else int(seq.sum()) * n + n * n * bs
        cases[f"tree{mode}"] = dict(
            kind="tree", parent_list=par, selected_index=sel, verified_seq_len=seq,
            tree_mask=torch.ones(mask_len, dtype=torch.bool), positions=torch.empty(bs * n, dtype=torch.long),
            retrive_index=torch.full((bs, n), -1, dtype=torch.long),
            retrive_next_token=torch.full((bs, n), -1, dtype=torch.long),
            retrive_next_sibling=torch.full((bs, n), -1, dtype=torch.long),
            topk=topk, depth=depth, draft_token_num=n, tree_mask_mode=mode)
    # verification over a real tree built by the CPU op (the tree op is checked separately above)
    t = dict(cases[f"tree{spec_ops.QLEN_ONLY}"])
    t = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in t.items()}
    run_tree(t)
    bs, n = t["retrive_index"].shape
    cand = torch.randint(0, 3, (bs, n), generator=g)
    cases["verify"] = dict(kind="verify", predicts=torch.full((bs * n,), -5, dtype=torch.long),
                           accept_index=torch.full((bs, 4), -1, dtype=torch.long),
                           accept_token_num=torch.zeros(bs, dtype=torch.long), candidates=cand,
                           retrive_index=t["retrive_index"], retrive_next_token=t["retrive_next_token"],
                           retrive_next_sibling=t["retrive_next_sibling"],
                           target_predict=torch.randint(0, 3, (bs, n), generator=g))
    rtt = torch.randint(0, 1000, (5, 32), generator=g, dtype=torch.long).to(torch.int32)
    cases["draft_locs"] = dict(kind="draft_locs", req_pool_indices=torch.tensor([4, 1, 2]), req_to_token=rtt,
                               seq_lens=torch.tensor([3, 17, 0]), out_cache_loc=torch.zeros(3 * 6, dtype=torch.long),
                               topk=2, num_steps=3)
    cases["extend_locs"] = dict(kind="extend_locs", req_pool_indices=torch.tensor([0, 3, 2]), req_to_token=rtt,
                                start_offset=torch.tensor([4, 0, 9]), end_offset=torch.tensor([8, 4, 13]),
                                out_cache_loc=torch.zeros(12, dtype=torch.long))
    cases["bonus"] = dict(kind="bonus", accept_tokens=torch.randint(0, 99, (3, 5), generator=g),
                          accept_lens=torch.tensor([1, 5, 3]), bonus_tokens=torch.zeros(3, dtype=torch.long),
                          accept_stride=5)
    cases["accept_locs"] = dict(kind="accept_locs", accept_index=torch.tensor([0, 1, -1, 5, -1, 7, 2, -1]),
                                out_cache_loc=torch.randint(0, 99, (8,), generator=g),
                                accept_out_cache_loc=torch.zeros(5, dtype=torch.long))
    return cases


def _run_cpu(case: dict) -> dict:
    c = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in case.items()}
    kind = c.pop("kind")
    if kind == "tree":
        run_tree(c)
    elif kind == "verify":
        run_verify(c)
    elif kind == "draft_locs":
        spec_ops.assign_draft_cache_locs_contiguous(c["req_pool_indices"], c["req_to_token"], c["seq_lens"],
                                                   c["out_cache_loc"], c["req_to_token"].shape[1], c["topk"],
                                                   c["num_steps"])
    elif kind == "extend_locs":
        spec_ops.assign_extend_cache_locs(c["req_pool_indices"], c["req_to_token"], c["start_offset"],
                                         c["end_offset"], c["out_cache_loc"], c["req_to_token"].shape[1])
    elif kind == "bonus":
        spec_ops.fill_bonus_tokens(c["accept_tokens"], c["accept_lens"], c["bonus_tokens"], c["accept_stride"])
    elif kind == "accept_locs":
        spec_ops.fill_accept_out_cache_loc(c["accept_index"], c["out_cache_loc"], c["accept_out_cache_loc"])
    return c


def test_cpu_ops_equal_sglang_triton_kernels(tmp_path):
    pytest.importorskip("sglang")
    pytest.importorskip("triton")
    cases = _random_cases(0)
    torch.save(cases, tmp_path / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("SGLANG_USE_CPU_ENGINE", None)
    proc = subprocess.run([sys.executable, str(HERE / "_triton_spec_kernels.py"), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    triton_out = torch.load(tmp_path / "out.pt")
    for name, case in cases.items():
        ours = _run_cpu(case)
        for key, value in triton_out[name].items():
            if torch.is_tensor(value):
                assert torch.equal(ours[key], value), (name, key, ours[key], value)
