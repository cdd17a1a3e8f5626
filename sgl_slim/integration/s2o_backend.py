"""SGLang glue for S2O sparse prefill: an attention backend registered as ``"s2o"``.

The launcher maps ``--s2o`` onto ``--prefill-attention-backend s2o`` (see :func:`adjust_server_args`);
SGLang then builds its ``HybridAttnBackend``: EXTEND / MIXED batches come here, DECODE goes to a stock
backend (torch_native on CPU, the user's or SGLang's default on GPU).

Per forward batch (:meth:`S2OAttnBackend.init_forward_metadata`) the K/V token slots of every sequence
are gathered from ``req_to_token`` into one flat index array (indices only, never K/V); every layer then
makes one ``sgl_slim.attention.s2o_attention_paged`` call per launch group: sequences of at least
``--s2o-min-length`` tokens run S2O with ``--s2o-tau``, shorter ones run the same kernel with tau = 0,
which is dense attention. The density each request achieved (mean over layers) is logged per forward
and accumulated in :data:`STATS`.

Anything S2O cannot serve exactly (head dim, dtype, sliding windows, cross-attention, encoder-only,
logit capping, attention sinks, speculative verification) raises :class:`ConfigError` naming the flag to
change, at startup where the model config tells, otherwise at the first forward of the layer.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from sgl_slim.config import ConfigError, S2OConfig, SlimConfig
from sgl_slim.integration.metrics import record_s2o

logger = logging.getLogger("sgl_slim.s2o")

BACKEND_NAME = "s2o"
GPU_HEAD_DIMS = (64, 128)
GPU_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

HOOKED_SYMBOLS: list[str] = [
    "sglang.srt.layers.attention.attention_registry.ATTENTION_BACKENDS",
    "sglang.srt.arg_groups.choices.ATTENTION_BACKEND_CHOICES",
    "sglang.srt.layers.attention.base_attn_backend.AttentionBackend",
    "sglang.srt.layers.attention.hybrid_attn_backend.HybridAttnBackend",
    "sglang.srt.layers.radix_attention.AttentionType",
    "sglang.srt.mem_cache.memory_pool.KVWriteLoc",
    "sglang.srt.model_executor.forward_batch_info.ForwardMode",
    "sglang.srt.runtime_context.get_spec",
    "sglang.srt.runtime_context.get_exec",
]

_state: dict = {"config": S2OConfig(), "backend_class": None}
_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------------
# Launcher side
# ----------------------------------------------------------------------------------------------------

def adjust_server_args(cfg: SlimConfig, args: argparse.Namespace, *, cpu: bool) -> None:
    """Map ``--s2o`` onto SGLang's flags (launcher process, after parsing, before ServerArgs).

    prefill backend -> "s2o"; decode backend -> torch_native on CPU unless the user chose one (on GPU the
    user's ``--decode-attention-backend`` / ``--attention-backend`` or SGLang's default); with speculative
    decoding, ``--speculative-attention-mode decode`` (verification runs on the stock decode backend); prefill
    CUDA graphs off on GPU (S2O's early stop is data dependent). Explicit conflicting flags raise ConfigError.
    """
    if not cfg.s2o.enabled:
        return
    _register_backend_name()
    prefill = getattr(args, "prefill_attention_backend", None)
    if prefill not in (None, BACKEND_NAME):
        raise ConfigError("--prefill-attention-backend",
                          f"--s2o runs prefill on the '{BACKEND_NAME}' backend, but "
                          f"--prefill-attention-backend {prefill} was given; drop one of them")
    if getattr(args, "attention_backend", None) == BACKEND_NAME and not getattr(args, "decode_attention_backend", None):
        raise ConfigError("--attention-backend", f"'{BACKEND_NAME}' serves prefill only; use --s2o (or "
                          f"--prefill-attention-backend {BACKEND_NAME}) and keep a stock decode backend")
    if getattr(args, "decode_attention_backend", None) == BACKEND_NAME:
        raise ConfigError("--decode-attention-backend", f"'{BACKEND_NAME}' serves prefill only; choose a "
                          f"stock decode backend (torch_native on CPU; flashinfer, fa3 or triton on GPU)")
    speculative = bool(getattr(args, "speculative_algorithm", None)) or cfg.eagle.enabled
    if speculative and getattr(args, "speculative_attention_mode", "prefill") != "decode":
        # S2O cannot verify draft trees; SGLang's other mode hands verify and draft extend to the decode backend.
        logger.info("sgl_slim: --s2o with speculative decoding: --speculative-attention-mode decode (target "
                    "verification and draft extends run on the stock decode backend)")
        args.speculative_attention_mode = "decode"
    if getattr(args, "dllm_algorithm", None):
        raise ConfigError("--dllm-algorithm", "--s2o serves causal prefill only; drop --s2o or --dllm-algorithm")
    args.prefill_attention_backend = BACKEND_NAME
    if cpu and not getattr(args, "decode_attention_backend", None) and not getattr(args, "attention_backend", None):
        args.decode_attention_backend = "torch_native"
    if not cpu:
        chosen = getattr(args, "cuda_graph_backend_prefill", None)
        if chosen not in (None, "disabled"):
            raise ConfigError("--cuda-graph-backend-prefill",
                              f"--s2o decides its sparsity on the fly and cannot run inside a captured prefill "
                              f"CUDA graph; drop --cuda-graph-backend-prefill {chosen}")
        args.disable_prefill_cuda_graph = True


# ----------------------------------------------------------------------------------------------------
# Registration (every SGLang process)
# ----------------------------------------------------------------------------------------------------

def install(cfg: SlimConfig) -> None:
    """Register the ``s2o`` backend name and factory; idempotent (runs in every process, maybe often)."""
    with _lock:
        _state["config"] = cfg.s2o
        _register_backend_name()
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS  # noqa: PLC0415
        ATTENTION_BACKENDS[BACKEND_NAME] = _create_s2o_backend


def _register_backend_name() -> None:
    # The choices list is the very object argparse and ServerArgs validate against: extend it in place.
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES  # noqa: PLC0415
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        ATTENTION_BACKEND_CHOICES.append(BACKEND_NAME)


def _create_s2o_backend(runner):
    cls = _state["backend_class"]
    if cls is None:
        cls = _state["backend_class"] = _make_backend_class()
    return cls(runner, _state["config"])


# ----------------------------------------------------------------------------------------------------
# Metadata: which rows and which token slots each launch reads (pure torch, unit-tested without SGLang)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchGroup:
    """One ``s2o_attention_paged`` call: a subset of the batch's sequences sharing one tau."""
    tau: float
    sparse: bool                    # False: tau = 0 because every sequence is shorter than min_length
    seq_ids: tuple[int, ...]        # positions in the forward batch
    q_rows: torch.Tensor | None     # [Tq_group] int64 rows of the batch's q (None: all rows, in order)
    qo_indptr: torch.Tensor         # [n+1] int32
    kv_indptr: torch.Tensor         # [n+1] int32
    kv_indices: torch.Tensor        # [sum kv_len] token slots, per sequence in position order


@dataclass(frozen=True)
class S2OForwardMetadata:
    groups: tuple[LaunchGroup, ...]
    seq_lens: tuple[int, ...]       # kv length per sequence (prefix + new)
    extend_lens: tuple[int, ...]    # new (query) tokens per sequence
    rids: tuple[str, ...] | None


def _ranges(starts: torch.Tensor, lens: list[int], total: int) -> torch.Tensor:
    """Concatenation of arange(starts[i], starts[i] + lens[i]) as int64, without a Python loop."""
    lens_t = torch.tensor(lens, dtype=torch.int64, device=starts.device)
    offsets = torch.cumsum(lens_t, 0) - lens_t                                  # [n] exclusive prefix sums
    base = torch.repeat_interleave(starts.long() - offsets, lens_t, output_size=total)
    return base + torch.arange(total, dtype=torch.int64, device=starts.device)


def _indptr(lens: list[int], device) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def build_launch_groups(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: list[int],
                        extend_lens: list[int], *, tau: float, min_length: int) -> tuple[LaunchGroup, ...]:
    """Split a batch into at most two launches (sparse: kv_len >= min_length; dense: shorter, tau = 0).

    req_to_token:     [max_reqs, max_context] token slot of position p of request row r.
    req_pool_indices: [B] request rows of the batch (device tensor).
    seq_lens:         [B] kv length of each sequence (cached prefix + new tokens).
    extend_lens:      [B] new tokens of each sequence; they are its LAST positions and sit packed in q
                      in batch order.
    """
    if len(seq_lens) != len(extend_lens) or len(seq_lens) != req_pool_indices.shape[0]:
        raise ValueError(f"batch of {req_pool_indices.shape[0]} requests but {len(seq_lens)} seq lens and "
                         f"{len(extend_lens)} extend lens")
    for b, (kv_len, q_len) in enumerate(zip(seq_lens, extend_lens)):
        if not 0 <= q_len <= kv_len:
            raise ValueError(f"sequence {b}: {q_len} new tokens but kv length {kv_len}")
    device = req_to_token.device
    q_starts = [0]
    for n in extend_lens[:-1]:
        q_starts.append(q_starts[-1] + n)
    sparse_ids = [b for b, n in enumerate(seq_lens) if n >= min_length]
    dense_ids = [b for b, n in enumerate(seq_lens) if n < min_length]
    groups = []
    for ids, sparse in ((sparse_ids, True), (dense_ids, False)):
        if not ids:
            continue
        kv_lens = [seq_lens[b] for b in ids]
        q_lens = [extend_lens[b] for b in ids]
        idx = torch.tensor(ids, dtype=torch.int64, device=req_pool_indices.device)
        rows = req_pool_indices.long()[idx].to(device)
        kv_total = sum(kv_lens)
        # kv_indices[t] = req_to_token[row of t's sequence, position of t in its sequence]
        pos = _ranges(torch.zeros(len(ids), dtype=torch.int64, device=device), kv_lens, kv_total)
        seq_of = torch.repeat_interleave(rows, torch.tensor(kv_lens, device=device), output_size=kv_total)
        kv_indices = req_to_token[seq_of, pos]
        whole = len(ids) == len(seq_lens)
        q_rows = None if whole else _ranges(torch.tensor([q_starts[b] for b in ids], device=device), q_lens,
                                            sum(q_lens))
        groups.append(LaunchGroup(tau=tau if sparse else 0.0, sparse=sparse, seq_ids=tuple(ids), q_rows=q_rows,
                                  qo_indptr=_indptr(q_lens, device), kv_indptr=_indptr(kv_lens, device),
                                  kv_indices=kv_indices))
    return tuple(groups)


# ----------------------------------------------------------------------------------------------------
# Per-process statistics (the metrics work exports these)
# ----------------------------------------------------------------------------------------------------

@dataclass
class S2OStats:
    """Achieved densities in this process. ``density`` is weighted by causal (query, key) pairs."""
    forwards: int = 0
    sparse_chunks: int = 0          # (request, forward) pairs served sparse
    dense_chunks: int = 0           # ... served dense because kv_len < min_length
    weighted_density: float = 0.0   # sum of density * causal pairs over sparse chunks
    causal_pairs: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (rid, kv_len, q_len, density, sparse)

    def record(self, rid: str | None, kv_len: int, q_len: int, density: float, sparse: bool) -> None:
        if sparse:
            pairs = q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2
            self.sparse_chunks += 1
            self.weighted_density += density * pairs
            self.causal_pairs += pairs
        else:
            self.dense_chunks += 1
        self.recent.append((rid, kv_len, q_len, density, sparse))

    @property
    def density(self) -> float:
        """Mean achieved density of sparse chunks (1.0 before any)."""
        return self.weighted_density / self.causal_pairs if self.causal_pairs else 1.0

    def snapshot(self) -> dict:
        return {"forwards": self.forwards, "sparse_chunks": self.sparse_chunks, "dense_chunks": self.dense_chunks,
                "density": self.density, "recent": list(self.recent)}


STATS = S2OStats()


# ----------------------------------------------------------------------------------------------------
# Checks: refuse what S2O cannot serve exactly, naming the flag to change
# ----------------------------------------------------------------------------------------------------

def check_runner(runner) -> None:
    """Startup checks from the model runner (the model config and resolved server arguments)."""
    from sglang.srt.runtime_context import get_exec, get_spec  # noqa: PLC0415
    mc = runner.model_config
    cpu = str(runner.device) == "cpu"
    if runner.use_mla_backend:
        raise ConfigError("--s2o", "MLA models (DeepSeek-style latent attention) are not supported; drop --s2o")
    if getattr(mc, "is_encoder_decoder", False):
        raise ConfigError("--s2o", "encoder-decoder models (cross-attention) are not supported; drop --s2o")
    if not getattr(mc, "is_generation", True):
        raise ConfigError("--s2o", "embedding / encoder-only models (bidirectional attention) are not "
                                   "supported; drop --s2o")
    if getattr(mc, "is_hybrid_swa", False) or getattr(mc, "attention_chunk_size", None):
        raise ConfigError("--s2o", "models with sliding-window or chunked-local attention layers are not "
                                   "supported; drop --s2o")
    dtype = mc.dtype
    allowed = CPU_DTYPES if cpu else GPU_DTYPES
    if dtype not in allowed:
        raise ConfigError("--dtype", f"S2O runs in {', '.join(str(d).removeprefix('torch.') for d in allowed)} "
                                     f"on {'CPU' if cpu else 'GPU'}, the model runs in {dtype}")
    if runner.kv_cache_dtype != dtype:
        raise ConfigError("--kv-cache-dtype", f"S2O reads K/V in the model dtype ({dtype}), the KV cache is "
                                              f"{runner.kv_cache_dtype}; use --kv-cache-dtype auto")
    head_dim = getattr(mc, "head_dim", None)
    if not cpu and head_dim not in GPU_HEAD_DIMS:
        raise ConfigError("--s2o", f"the Triton kernel supports head dims {GPU_HEAD_DIMS}, this model has "
                                   f"{head_dim}; drop --s2o")
    if getattr(runner, "decode_attention_backend_str", None) == BACKEND_NAME:
        raise ConfigError("--decode-attention-backend", f"'{BACKEND_NAME}' serves prefill only; choose a stock "
                                                        f"decode backend (torch_native on CPU)")
    spec = get_spec()
    if spec.speculative_algorithm is not None and spec.speculative_attention_mode != "decode":
        raise ConfigError("--speculative-attention-mode", "S2O cannot run target verification (tree masks); "
                                                          "pass --speculative-attention-mode decode")
    if get_exec().dllm.dllm_algorithm is not None:
        raise ConfigError("--dllm-algorithm", "S2O serves causal prefill only; drop --s2o or --dllm-algorithm")


def check_layer(layer, *, cpu: bool) -> None:
    """First-use checks of one attention layer."""
    from sglang.srt.layers.radix_attention import AttentionType  # noqa: PLC0415
    where = f"layer {layer.layer_id}"
    if layer.is_cross_attention:
        raise ConfigError("--s2o", f"{where} is a cross-attention layer; S2O serves causal self-attention only")
    if layer.attn_type != AttentionType.DECODER:
        raise ConfigError("--s2o", f"{where} has attention type {layer.attn_type.value}; S2O serves causal "
                                   f"(decoder) attention only")
    if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
        raise ConfigError("--s2o", f"{where} uses a sliding window of {layer.sliding_window_size}; S2O needs "
                                   f"full causal attention; drop --s2o for this model")
    if getattr(layer, "use_irope", False):
        raise ConfigError("--s2o", f"{where} uses chunked local attention (iRoPE); drop --s2o")
    if layer.logit_cap and layer.logit_cap > 0:
        raise ConfigError("--s2o", f"{where} caps attention logits ({layer.logit_cap}); S2O has no logit "
                                   f"capping; drop --s2o")
    if layer.qk_head_dim != layer.v_head_dim:
        raise ConfigError("--s2o", f"{where} has qk head dim {layer.qk_head_dim} != v head dim "
                                   f"{layer.v_head_dim}; drop --s2o")
    if not cpu and layer.qk_head_dim not in GPU_HEAD_DIMS:
        raise ConfigError("--s2o", f"{where} has head dim {layer.qk_head_dim}; the kernel supports "
                                   f"{GPU_HEAD_DIMS}; drop --s2o")
    if layer.k_scale is not None or layer.v_scale is not None:
        raise ConfigError("--kv-cache-dtype", f"{where} has a quantised KV cache (k/v scales); S2O reads "
                                              f"K/V in the model dtype; use --kv-cache-dtype auto")


# Keyword arguments RadixAttention may pass that S2O can honour (none change the math).
_HARMLESS_KWARGS = frozenset()


# ----------------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------------

def _make_backend_class():
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend  # noqa: PLC0415
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc  # noqa: PLC0415
    from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: PLC0415

    from sgl_slim.attention import s2o_attention_paged  # noqa: PLC0415

    class S2OAttnBackend(AttentionBackend):
        """S2O for EXTEND / MIXED batches. DECODE belongs to the stock backend of the hybrid wrapper."""

        def __init__(self, model_runner, cfg: S2OConfig):
            super().__init__()
            check_runner(model_runner)
            self.cfg = cfg
            self.cpu = str(model_runner.device) == "cpu"
            self.req_to_token_pool = model_runner.req_to_token_pool
            self.token_to_kv_pool = model_runner.token_to_kv_pool
            # layers per forward on this rank: the pool holds one K/V buffer per attention layer
            self.num_layers = getattr(self.token_to_kv_pool, "layer_num", None) or \
                model_runner.model_config.num_hidden_layers
            self.forward_metadata = None
            self._metadata_batch = None     # the ForwardBatch forward_metadata was built for
            self._density_sum = None        # [B] sum over layers of per-sequence density
            self._layers_seen = 0
            self._checked_layers: set[int] = set()
            logger.info("S2O prefill backend: tau=%g block_size=%d segment_size=%d min_length=%d (%s)",
                        cfg.tau, cfg.block_size, cfg.segment_size, cfg.min_length,
                        "fp32 reference on CPU" if self.cpu else "Triton kernel")

        # -- metadata ---------------------------------------------------------------------------------
        def init_forward_metadata(self, forward_batch):
            self._build_metadata(forward_batch)

        def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
            if in_capture:
                raise ConfigError("--cuda-graph-backend-prefill", "S2O cannot be captured in a prefill CUDA "
                                                                  "graph; pass --disable-prefill-cuda-graph")
            self._build_metadata(forward_batch)

        def _build_metadata(self, fb):
            self._flush_stats()
            mode = fb.forward_mode
            if mode.is_decode_or_idle():
                self.forward_metadata, self._metadata_batch = None, fb
                return
            self._check_mode(mode)
            seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
            extend_lens = (list(fb.extend_seq_lens_cpu) if fb.extend_seq_lens_cpu is not None
                           else fb.extend_seq_lens.tolist())
            groups = build_launch_groups(self.req_to_token_pool.req_to_token, fb.req_pool_indices, seq_lens,
                                         extend_lens, tau=self.cfg.tau, min_length=self.cfg.min_length)
            rids = tuple(fb.rids) if getattr(fb, "rids", None) else None
            self.forward_metadata = S2OForwardMetadata(groups=groups, seq_lens=tuple(seq_lens),
                                                       extend_lens=tuple(extend_lens), rids=rids)
            self._metadata_batch = fb
            self._density_sum = [0.0] * len(seq_lens)
            self._layers_seen = 0
            STATS.forwards += 1

        @staticmethod
        def _check_mode(mode):
            if mode.is_target_verify():
                raise ConfigError("--speculative-attention-mode", "S2O cannot run speculative target "
                                  "verification (tree masks); pass --speculative-attention-mode decode")
            if mode not in (ForwardMode.EXTEND, ForwardMode.MIXED):
                raise ConfigError("--s2o", f"S2O serves EXTEND / MIXED batches, got {mode.name}; drop --s2o "
                                           f"for this serving mode")

        # -- forward ----------------------------------------------------------------------------------
        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            unknown = {key for key, val in kwargs.items() if val is not None} - _HARMLESS_KWARGS
            if unknown:
                raise ConfigError("--s2o", f"layer {layer.layer_id} passes {sorted(unknown)} (e.g. attention "
                                           f"sinks), which S2O does not implement; drop --s2o")
            if layer.layer_id not in self._checked_layers:
                check_layer(layer, cpu=self.cpu)
                self._checked_layers.add(layer.layer_id)
            if self._metadata_batch is not forward_batch or self.forward_metadata is None:
                self._build_metadata(forward_batch)
            meta = self.forward_metadata

            if save_kv_cache and k is not None and v is not None:
                self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)

            hq, d = layer.tp_q_head_num, layer.qk_head_dim
            q3 = q.reshape(-1, hq, d)                                   # [T, Hq, D]
            out = torch.empty_like(q3)
            k_pool = self.token_to_kv_pool.get_key_buffer(layer.layer_id)   # [slots, Hkv, D]
            v_pool = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
            for g in meta.groups:
                q_g = q3 if g.q_rows is None else q3.index_select(0, g.q_rows)
                o_g, stats = s2o_attention_paged(
                    q_g, k_pool, v_pool, qo_indptr=g.qo_indptr, kv_indptr=g.kv_indptr, kv_indices=g.kv_indices,
                    tau=g.tau, block_size=self.cfg.block_size, segment_size=self.cfg.segment_size,
                    sm_scale=layer.scaling, return_stats=True)
                if g.q_rows is None:
                    out = o_g
                else:
                    out.index_copy_(0, g.q_rows, o_g)
                for b, dens in zip(g.seq_ids, stats["density_per_seq"]):
                    self._density_sum[b] += dens
            self._layers_seen += 1
            if self._layers_seen == self.num_layers:
                self._flush_stats()
            return out.reshape(q.shape[0], hq * layer.v_head_dim)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            raise ConfigError("--decode-attention-backend", f"'{BACKEND_NAME}' serves prefill only; choose a "
                                                            f"stock decode backend")

        def support_triton(self):
            return False

        # -- stats ------------------------------------------------------------------------------------
        def _flush_stats(self):
            meta, layers = self.forward_metadata, self._layers_seen
            if meta is None or not layers:
                return
            sparse_of = {b: g.sparse for g in meta.groups for b in g.seq_ids}
            for b, (kv_len, q_len) in enumerate(zip(meta.seq_lens, meta.extend_lens)):
                density = self._density_sum[b] / layers
                rid = meta.rids[b] if meta.rids else None
                STATS.record(rid, kv_len, q_len, density, sparse_of[b])
                record_s2o(rid, kv_len, q_len, density, sparse_of[b])     # per-request numbers (metrics.py)
                logger.info("S2O prefill rid=%s kv_len=%d new=%d density=%.4f %s (mean of %d layers)", rid,
                            kv_len, q_len, density,
                            f"tau={self.cfg.tau:g}" if sparse_of[b]
                            else f"dense (kv_len < --s2o-min-length {self.cfg.min_length})", layers)
            self._layers_seen = 0

    return S2OAttnBackend
