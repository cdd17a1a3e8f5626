"""torch_native attention pieces for SGLang's EAGLE worker on a CPU (imported lazily by
``sgl_slim.integration.eagle``)."""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc


class TorchNativeDraftStepBackend(TorchNativeAttnBackend):
    """Draft decode step ``step`` (0-based) of a chain: the query token sits at position seq_len + step and
    attends to the prefix plus the ``step + 1`` draft tokens written so far (its own included)."""

    def __init__(self, model_runner, step: int):
        super().__init__(model_runner)
        self.step = step

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        prefix_lens = forward_batch.seq_lens
        forward_batch.seq_lens = prefix_lens + (self.step + 1)
        try:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        finally:
            forward_batch.seq_lens = prefix_lens


class TorchNativeMultiStepDraftBackend:
    """One torch_native backend per draft decode step (``speculative_num_steps - 1`` of them)."""

    def __init__(self, model_runner, topk: int, speculative_num_steps: int):
        if topk != 1:
            raise ValueError(f"sgl_slim's CPU EAGLE path drafts chains only: --speculative-eagle-topk must be 1 "
                             f"on the CPU, got {topk} (--eagle-draft sets 1)")
        self.topk = topk
        self.speculative_num_steps = speculative_num_steps
        self.attn_backends = [TorchNativeDraftStepBackend(model_runner, i) for i in range(speculative_num_steps - 1)]

    def init_forward_metadata(self, forward_batch):
        for backend in self.attn_backends:
            backend.init_forward_metadata(forward_batch)


def forward_target_verify(backend: TorchNativeAttnBackend, q, k, v, layer, forward_batch, save_kv_cache=True):
    """TARGET_VERIFY on torch_native: every request verifies N draft tokens after its ``seq_lens`` prefix.

    q: [B*N, Hq*D]. The N tokens' KV slots come from ``req_to_token[row, seq_len : seq_len + N]`` (written
    here first). Draft tokens see the whole prefix; among themselves a causal chain, or the tree mask in
    ``spec_info.custom_mask`` ([B, N, N], QLEN_ONLY layout) when there is one.
    """
    if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
        raise NotImplementedError("sgl_slim CPU EAGLE verify: cross attention / sliding windows are not supported")
    o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
    if save_kv_cache and k is not None and v is not None:
        backend.token_to_kv_pool.set_kv_buffer(
            layer, KVWriteLoc(forward_batch.out_cache_loc, backend.swa_out_cache_loc), k, v)
    q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
    o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
    k_cache = backend.token_to_kv_pool.get_key_buffer(layer.layer_id)
    v_cache = backend.token_to_kv_pool.get_value_buffer(layer.layer_id)
    req_to_token = backend.req_to_token_pool.req_to_token
    bs = forward_batch.req_pool_indices.shape[0]
    n = q_.shape[0] // bs
    if n * bs != q_.shape[0]:
        raise ValueError(f"TARGET_VERIFY: {q_.shape[0]} query tokens do not split evenly over {bs} requests")
    custom_mask = getattr(forward_batch.spec_info, "custom_mask", None)
    tree = None
    if custom_mask is not None:
        if custom_mask.numel() != bs * n * n:
            raise NotImplementedError(f"TARGET_VERIFY: custom_mask of {custom_mask.numel()} entries is not the "
                                      f"QLEN_ONLY layout [{bs}, {n}, {n}]")
        tree = custom_mask.view(bs, n, n).bool()
    chain = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    for i, (row, prefix) in enumerate(zip(forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist())):
        slots = req_to_token[row, : prefix + n]
        key = k_cache[slots].movedim(0, 1).to(q.dtype)                 # [Hkv, prefix + N, D]
        value = v_cache[slots].movedim(0, 1).to(q.dtype)
        query = q_[i * n: (i + 1) * n].movedim(0, 1)                   # [Hq, N, D]
        mask = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device)
        mask[:, prefix:] = chain if tree is None else tree[i]
        out = scaled_dot_product_attention(query[None], key[None], value[None], attn_mask=mask,
                                           scale=layer.scaling,
                                           enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num)
        o_[i * n: (i + 1) * n] = out[0].movedim(0, 1)
    return o
