"""Pure-torch ``torch.ops.sgl_kernel.*_cpu`` ops that SGLang's EAGLE worker calls on a CPU.

SGLang's CPU engine imports these from ``sgl_kernel`` (a CPU kernel build that is not on PyPI). Each
function is a line-by-line port of SGLang 0.5.23's own Triton kernel of the same name, one program id per
loop iteration, quirks included:

- ``assign_draft_cache_locs_contiguous``  kernels/ops/speculative/cache_locs.py (every draft round)
- ``assign_extend_cache_locs``            kernels/ops/speculative/cache_locs.py (every verify)
- ``build_tree_kernel_efficient``         kernels/ops/speculative/spec_tree.py  (every verify)
- ``verify_tree_greedy``                  kernels/ops/speculative/spec_tree.py  (every verify)
- ``fill_bonus_tokens``                   kernels/ops/speculative/eagle.py      (every verify)
- ``fill_accept_out_cache_loc``           kernels/ops/speculative/eagle.py      (tree drafts, topk > 1)

Integer tensors are small (one row per request); the loops run on Python ints.
No sglang import: :func:`register` defines the ops through ``sgl_slim.standins.define_ops`` (a ``sgl_kernel``
FRAGMENT library).
"""

from __future__ import annotations

import torch


FULL_MASK, QLEN_ONLY = 0, 1     # spec_tree.TreeMaskMode


def assign_draft_cache_locs_contiguous(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                       seq_lens: torch.Tensor, out_cache_loc: torch.Tensor,
                                       pool_len: int, topk: int, num_steps: int) -> None:
    """Request i: out_cache_loc[i*topk*num_steps : +topk*num_steps] = req_to_token[row_i, seq_lens[i]:+that]."""
    n = topk * num_steps
    for i, (row, start) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        out_cache_loc[i * n: (i + 1) * n] = req_to_token[row, start: start + n].to(out_cache_loc.dtype)


def assign_extend_cache_locs(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                             start_offset: torch.Tensor, end_offset: torch.Tensor,
                             out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """Pack req_to_token[row_i, start_i:end_i] of every request back to back into out_cache_loc."""
    pos = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        out_cache_loc[pos: pos + end - start] = req_to_token[row, start:end].to(out_cache_loc.dtype)
        pos += end - start


def fill_bonus_tokens(accept_tokens: torch.Tensor, accept_lens: torch.Tensor, bonus_tokens: torch.Tensor,
                      accept_stride: int) -> None:
    """bonus_tokens[i] = the last accepted token of request i (accept_lens includes the bonus)."""
    flat = accept_tokens.reshape(-1)
    for i, n in enumerate(accept_lens.tolist()):
        bonus_tokens[i] = flat[accept_stride * i + n - 1]


def fill_accept_out_cache_loc(accept_index: torch.Tensor, out_cache_loc: torch.Tensor,
                              accept_out_cache_loc: torch.Tensor) -> None:
    """Compact out_cache_loc[accept_index[j]] over the entries with accept_index[j] != -1, in order."""
    dst = 0
    for src in accept_index.reshape(-1).tolist():
        if src > -1:
            accept_out_cache_loc[dst] = out_cache_loc[src]
            dst += 1


def build_tree_kernel_efficient(parent_list: torch.Tensor, selected_index: torch.Tensor,
                                verified_seq_len: torch.Tensor, tree_mask: torch.Tensor,
                                positions: torch.Tensor, retrive_index: torch.Tensor,
                                retrive_next_token: torch.Tensor, retrive_next_sibling: torch.Tensor,
                                topk: int, depth: int, draft_token_num: int, tree_mask_mode: int) -> None:
    """Retrieval links, positions and the attention mask of each request's draft tree (topk = 1: a chain).

    Outputs (pre-filled by the caller: next_token / next_sibling with -1): retrive_index [B, N] (global
    draft-token index), retrive_next_token / retrive_next_sibling [B, N] (first child / next sibling),
    positions [B*N] (seq_len + depth), tree_mask (FULL_MASK: per request (seq_len + N) x N rows after the
    previous requests' blocks; QLEN_ONLY: [B, N, N]).
    """
    if tree_mask_mode not in (FULL_MASK, QLEN_ONLY):
        raise NotImplementedError(f"tree_mask_mode {tree_mask_mode}: only FULL_MASK (0) and QLEN_ONLY (1)")
    n = draft_token_num
    seq_lens = verified_seq_len.tolist()
    parents = parent_list.reshape(parent_list.shape[0], -1) if parent_list.dim() > 1 else parent_list.reshape(1, -1)
    selected = selected_index.reshape(selected_index.shape[0], -1).tolist()
    parents = parents.tolist()
    mask = tree_mask.view(-1)
    pos = positions.view(-1)
    r_index, r_next, r_sib = retrive_index.view(-1), retrive_next_token.view(-1), retrive_next_sibling.view(-1)
    prefix_sum = 0
    for b, seq_len in enumerate(seq_lens):
        sel, par = selected[b], parents[b] if b < len(parents) else None
        seq_tree_idx = n * n * b + prefix_sum * n
        pos[b * n] = seq_len

        def position_of(token_idx: int) -> int:
            """1 + index in sel of ``token_idx`` (0 = the verified root), -1 when absent."""
            for pp in range(n - 1):
                if sel[pp] == token_idx:
                    return pp + 1
            return -1

        for i in range(n - 1, 0, -1):
            r_index[b * n + i] = b * n + i
            parent_tb_idx = sel[i - 1] // topk
            parent_position = 0 if parent_tb_idx == 0 else position_of(par[parent_tb_idx])
            if parent_position >= 0:
                addr = b * n + parent_position
                next_tok = int(r_next[addr])
                r_next[addr] = i
                if next_tok != -1:
                    r_sib[b * n + i] = next_tok
        r_index[b * n] = b * n

        for x in range(n):
            if tree_mask_mode == FULL_MASK:
                token_tree_idx = seq_tree_idx + (seq_len + n) * x + seq_len + 1
            else:
                token_tree_idx = n * n * b + n * x + 1
            mask[token_tree_idx - 1] = True
            mask[token_tree_idx: token_tree_idx + n - 1] = False
            if x == 0:
                continue
            cur, position = x - 1, 0
            for _ in range(depth):
                position += 1
                mask[token_tree_idx + cur] = True
                parent_tb_idx = sel[cur] // topk
                if parent_tb_idx == 0:
                    break
                found = position_of(par[parent_tb_idx])
                if found < 0:
                    break
                cur = found - 1
            pos[b * n + x] = position + seq_len
        prefix_sum += seq_len


def verify_tree_greedy(predicts: torch.Tensor, accept_index: torch.Tensor, accept_token_num: torch.Tensor,
                       candidates: torch.Tensor, retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
                       retrive_next_sibling: torch.Tensor, target_predict: torch.Tensor) -> None:
    """Greedy verification: walk each request's tree from the root, following the child whose draft token
    equals the target's token at the last accepted node. Writes predicts (flat [B*N]), accept_index
    [B, S] (global indices of accepted nodes, root first) and accept_token_num [B] (accepted drafts)."""
    bs, n = candidates.shape
    num_spec = accept_index.shape[1]
    cand = candidates.tolist()
    r_index, r_next, r_sib = retrive_index.tolist(), retrive_next_token.tolist(), retrive_next_sibling.tolist()
    target = target_predict.reshape(-1).tolist()
    pred = predicts.view(-1)
    for bx in range(bs):
        last = r_index[bx][0]
        accept_index[bx, 0] = last
        accepted, cur = 0, 0
        for _ in range(1, num_spec):
            cur = r_next[bx][cur]
            target_token = target[last]
            matched = False
            while cur != -1:
                if cand[bx][cur] == target_token:
                    pred[last] = target_token
                    accepted += 1
                    accept_index[bx, accepted] = r_index[bx][cur]
                    last = r_index[bx][cur]
                    matched = True
                    break
                cur = r_sib[bx][cur]
            if not matched:
                break
        accept_token_num[bx] = accepted
        pred[last] = target[last]


_OPS = {
    "assign_draft_cache_locs_contiguous_cpu": (
        "(Tensor req_pool_indices, Tensor req_to_token, Tensor seq_lens, Tensor(a!) out_cache_loc, "
        "int pool_len, int topk, int num_steps) -> ()", assign_draft_cache_locs_contiguous),
    "assign_extend_cache_locs_cpu": (
        "(Tensor req_pool_indices, Tensor req_to_token, Tensor start_offset, Tensor end_offset, "
        "Tensor(a!) out_cache_loc, int pool_len) -> ()", assign_extend_cache_locs),
    "fill_bonus_tokens_cpu": (
        "(Tensor accept_tokens, Tensor accept_lens, Tensor(a!) bonus_tokens, int accept_stride) -> ()",
        fill_bonus_tokens),
    "fill_accept_out_cache_loc_cpu": (
        "(Tensor accept_index, Tensor out_cache_loc, Tensor(a!) accept_out_cache_loc) -> ()",
        fill_accept_out_cache_loc),
    "build_tree_kernel_efficient_cpu": (
        "(Tensor parent_list, Tensor selected_index, Tensor verified_seq_len, Tensor(a!) tree_mask, "
        "Tensor(b!) positions, Tensor(c!) retrive_index, Tensor(d!) retrive_next_token, "
        "Tensor(e!) retrive_next_sibling, int topk, int depth, int draft_token_num, int tree_mask_mode) -> ()",
        build_tree_kernel_efficient),
    "verify_tree_greedy_cpu": (
        "(Tensor(a!) predicts, Tensor(b!) accept_index, Tensor(c!) accept_token_num, Tensor candidates, "
        "Tensor retrive_index, Tensor retrive_next_token, Tensor retrive_next_sibling, Tensor target_predict) -> ()",
        verify_tree_greedy),
}

OP_NAMES = tuple(_OPS)


def register() -> list[str]:
    """Define the ops under ``torch.ops.sgl_kernel`` unless already there (idempotent); returns those added."""
    from sgl_slim.standins import define_ops  # noqa: PLC0415 (one registration helper for all stand-ins)

    return define_ops(_OPS)
