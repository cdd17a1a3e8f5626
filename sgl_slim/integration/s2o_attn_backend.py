"""The S2O attention backend class (imports SGLang; loaded only when SGLang builds the ``s2o`` backend).

Routing, planning, checks and statistics are in :mod:`sgl_slim.integration.s2o_backend`; this class wires them
into SGLang's ``AttentionBackend`` interface. It holds an instance of the stock prefill backend (the one the
same server would use without ``--s2o``) and hands it every dense batch, and every layer whose tau is 0.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.runtime_context import get_exec, get_parallel

from sgl_slim.config import ConfigError, S2OConfig
from sgl_slim.integration import s2o_backend as glue
from sgl_slim.integration.metrics import record_s2o
from sgl_slim.integration.request_hooks import s2o_taus
from sgl_slim.integration.s2o_backend import STATS, LayerTaus, Route

logger = logging.getLogger("sgl_slim.s2o")


def stock_backend_name(runner) -> str:
    """The prefill backend this server would run without ``--s2o``: SGLang's resolved ``--attention-backend``
    (its own default when the flag is unset; torch_native on CPU), else the decode backend."""
    base = get_exec().kernel.attention_backend
    if base and base != glue.BACKEND_NAME:
        return base
    return runner.decode_attention_backend_str


class S2OAttnBackend(AttentionBackend):
    """S2O for EXTEND / MIXED batches. DECODE belongs to the stock decode backend of SGLang's hybrid wrapper."""

    def __init__(self, model_runner, cfg: S2OConfig, *, stock: AttentionBackend, taus: LayerTaus):
        super().__init__()
        self.cfg = cfg
        self.stock = stock
        self.taus = taus
        self.cpu = str(model_runner.device) == "cpu"
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        # layers per forward on this rank: the pool holds one K/V buffer per attention layer
        self.num_layers = getattr(self.token_to_kv_pool, "layer_num", None) or \
            model_runner.model_config.num_hidden_layers
        # per-head taus as host tensors, built once (the kernel API copies them with its plan)
        self._head_taus = {layer: torch.tensor(row, dtype=torch.float32) for layer, row in
                           enumerate(taus.rows or ()) if isinstance(taus.tau(layer), tuple)}
        self.plan: glue.S2OBatchPlan | None = None
        self._plan_batch = None          # the ForwardBatch self.plan was built for
        self._dense_layers = 0                # layers of this batch on the stock backend (density 1 for all)
        self._sparse_sum = None               # [B] fp64 on the device: sum over S2O layers of each density
        self._layers_seen = 0
        self._checked_layers: set[int] = set()
        logger.info("S2O prefill backend: variant=%s%s %s block_size=%d segment_size=%d min_length=%d (%s); "
                    "dense batches on %s", taus.variant or "default",
                    ("" if cfg.audit_last is None else f" audit_last={cfg.audit_last}") +
                    ("" if cfg.audit_form is None else f" audit_form={cfg.audit_form}"), taus.describe(),
                    cfg.block_size, cfg.segment_size, cfg.min_length,
                    "fp32 reference on CPU" if self.cpu else "Triton kernel", type(stock).__name__)

    @classmethod
    def from_runner(cls, model_runner, cfg: S2OConfig) -> "S2OAttnBackend":
        """SGLang's factory path: startup checks, the calibration against the model, the stock backend."""
        glue.check_runner(model_runner)
        calibration = cfg.load_calibration()
        taus = LayerTaus.from_config(cfg)
        if calibration is not None:
            mc = model_runner.model_config
            total_kv_heads = mc.get_total_num_kv_heads()
            glue.check_calibration(calibration, cfg, num_layers=mc.num_hidden_layers, num_kv_heads=total_kv_heads,
                                   head_dim=mc.head_dim)
            kv_heads = glue.local_kv_heads(total_kv_heads, get_parallel().tp_rank, get_parallel().tp_size)
            taus = LayerTaus.from_config(cfg, calibration, kv_heads=kv_heads)
        stock = ATTENTION_BACKENDS[stock_backend_name(model_runner)](model_runner)
        return cls(model_runner, cfg, stock=stock, taus=taus)

    # -- metadata: once per forward batch -------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        self._flush_stats()
        fb = forward_batch
        glue.check_forward_mode(fb.forward_mode)
        seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        extend_lens = (list(fb.extend_seq_lens_cpu) if fb.extend_seq_lens_cpu is not None
                       else fb.extend_seq_lens.tolist())
        rids = tuple(fb.rids) if getattr(fb, "rids", None) else None
        self.plan = glue.plan_batch(self.req_to_token, fb.req_pool_indices, seq_lens, extend_lens, taus=self.taus,
                                    min_length=self.cfg.min_length, rids=rids, seq_taus=s2o_taus(rids))
        if self.plan.route is Route.STOCK or self.taus.any_dense_layer:
            self.stock.init_forward_metadata(fb)
        self._plan_batch = fb
        self._dense_layers, self._sparse_sum = 0, None
        self._layers_seen = 0
        STATS.forwards += 1

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        if in_capture:
            raise ConfigError("--cuda-graph-backend-prefill", glue.MSG_NO_PREFILL_GRAPH)
        self.init_forward_metadata(forward_batch)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        # SGLang's hybrid wrapper captures its prefill backend only for prefill-mode verification or dLLM,
        # both refused at startup (check_serving_mode); decode graphs belong to the decode backend.
        raise ConfigError("--speculative-attention-mode", glue.MSG_NO_VERIFY)

    # -- forward --------------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        glue.check_kwargs(layer.layer_id, kwargs)
        if layer.layer_id not in self._checked_layers:
            glue.check_layer(layer, cpu=self.cpu)
            self._checked_layers.add(layer.layer_id)
        if self._plan_batch is not forward_batch or self.plan is None:
            self.init_forward_metadata(forward_batch)
        plan = self.plan
        if plan.route is Route.STOCK or (self.taus.dense(layer.layer_id) and not plan.own_taus):
            out = self.stock.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
            self._count_layer(None)
            return out
        if save_kv_cache and k is not None and v is not None:
            # an fp8 cache with scales stores K / k_scale, V / v_scale (as the stock backends write it)
            scales = () if layer.k_scale is None else (layer.k_scale, layer.v_scale)
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v,
                                                *scales)
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        tau = self._head_taus.get(layer.layer_id, self.taus.tau(layer.layer_id))
        out, densities = glue.run_s2o_layer(
            plan, q.reshape(-1, hq, d), self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id), tau=tau, block_size=self.cfg.block_size,
            segment_size=self.cfg.segment_size, sm_scale=layer.scaling, variant=self.taus.variant,
            k_scale=layer.k_scale_float or 1.0, v_scale=layer.v_scale_float or 1.0,
            audit_last=self.cfg.audit_last, audit_form=self.cfg.audit_form)
        self._count_layer(densities)
        return out.reshape(q.shape[0], hq * layer.v_head_dim)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        raise ConfigError("--decode-attention-backend", glue.MSG_PREFILL_ONLY)

    def support_triton(self):
        return False

    # -- stats ----------------------------------------------------------------------------------------
    def _count_layer(self, densities: torch.Tensor | None) -> None:
        # densities: [B] on the device from an S2O layer (summed there, read once at the flush); None: a stock layer
        if densities is None:
            self._dense_layers += 1
        else:
            self._sparse_sum = densities if self._sparse_sum is None else self._sparse_sum + densities
        self._layers_seen += 1
        if self._layers_seen == self.num_layers:
            self._flush_stats()

    def _flush_stats(self):
        plan, layers = self.plan, self._layers_seen
        if plan is None or not layers:
            return
        # the one device read of the batch
        sparse_sum = self._sparse_sum.tolist() if self._sparse_sum is not None else [0.0] * len(plan.seq_lens)
        for b, (kv_len, q_len, reason) in enumerate(zip(plan.seq_lens, plan.extend_lens, plan.reasons)):
            density = (sparse_sum[b] + self._dense_layers) / layers
            sparse = reason is glue.DenseReason.NONE
            rid = plan.rids[b] if plan.rids else None
            STATS.record(rid, kv_len, q_len, density, sparse)
            record_s2o(rid, kv_len, q_len, density, sparse)     # per-request numbers (metrics.py)
            own = plan.seq_taus[b] if plan.seq_taus else None
            how = (f"tau={own:g} (request)" if own is not None else self.taus.describe()) if sparse \
                else reason.value.format(min_length=self.cfg.min_length)
            logger.info("S2O prefill rid=%s kv_len=%d new=%d density=%.4f %s (mean of %d layers)", rid, kv_len,
                        q_len, density, how, layers)
        self._layers_seen, self._dense_layers, self._sparse_sum = 0, 0, None
