"""Run SGLang's own speculative Triton kernels under TRITON_INTERPRET=1 on the inputs in argv[1] (torch.save'd
dict) and write their outputs to argv[2]. A subprocess: the interpreter flag must be set before triton loads."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from sglang.kernels.ops.speculative import cache_locs, eagle, spec_tree  # noqa: E402
from sglang.srt.utils import next_power_of_2  # noqa: E402


def main(src: str, dst: str) -> None:
    cases = torch.load(src)
    out = {}
    for name, case in cases.items():
        c = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in case.items()}
        kind = c.pop("kind")
        if kind == "tree":
            spec_tree.sgl_build_tree_kernel_triton(
                c["parent_list"], c["selected_index"], c["verified_seq_len"], c["tree_mask"], c["positions"],
                c["retrive_index"], c["retrive_next_token"], c["retrive_next_sibling"], c["topk"], c["depth"],
                c["draft_token_num"], spec_tree.TreeMaskMode(c["tree_mask_mode"]))
        elif kind == "verify":
            spec_tree.verify_tree_greedy_triton(
                c["predicts"], c["accept_index"], c["accept_token_num"], c["candidates"], c["retrive_index"],
                c["retrive_next_token"], c["retrive_next_sibling"], c["target_predict"])
        elif kind == "draft_locs":
            bs = c["seq_lens"].shape[0]
            cache_locs.assign_draft_cache_locs_contiguous[(bs,)](
                c["req_pool_indices"], c["req_to_token"], c["seq_lens"], c["out_cache_loc"],
                c["req_to_token"].shape[1], c["topk"], c["num_steps"], BS=bs)
        elif kind == "extend_locs":
            bs = c["start_offset"].shape[0]
            cache_locs.assign_extend_cache_locs[(bs,)](
                c["req_pool_indices"], c["req_to_token"], c["start_offset"], c["end_offset"], c["out_cache_loc"],
                c["req_to_token"].shape[1], next_power_of_2(bs))
        elif kind == "bonus":
            bs = c["accept_lens"].shape[0]
            eagle.fill_bonus_tokens[(bs,)](c["accept_tokens"], c["accept_lens"], c["bonus_tokens"],
                                           c["accept_stride"])
        elif kind == "accept_locs":
            size = c["accept_index"].numel()
            eagle.fill_accept_out_cache_loc[(size,)](c["accept_index"], c["out_cache_loc"],
                                                     c["accept_out_cache_loc"], next_power_of_2(size))
        else:
            raise ValueError(kind)
        out[name] = c
    torch.save(out, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
