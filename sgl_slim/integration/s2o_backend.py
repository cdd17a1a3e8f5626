"""SGLang glue for S2O sparse prefill: an attention backend registered as ``"s2o"``.

The launcher maps ``--s2o`` onto ``--prefill-attention-backend s2o`` (see :func:`adjust_server_args`);
SGLang then builds its ``HybridAttnBackend``: EXTEND / MIXED batches come to the S2O backend, DECODE goes to
a stock backend (torch_native on CPU, the user's or SGLang's default on GPU; decode CUDA graphs untouched).

The backend class itself lives in :mod:`sgl_slim.integration.s2o_attn_backend`, imported only when SGLang
builds it. This module holds what needs no SGLang object: the flag mapping, the registration, the per-batch
plan (:func:`plan_batch`), the statistics and the checks.

Routing, decided once per forward batch (:func:`plan_batch`):

* **stock** — the batch is dense: ``--s2o-tau 0`` (and no calibration with a non-zero tau), every sequence
  is shorter than ``--s2o-min-length``, or its requests asked for dense attention (``sgl_slim`` settings
  ``s2o: false`` or ``s2o_tau: 0``). The whole batch runs through the stock backend the same server would
  use for prefill without ``--s2o`` (held by the S2O backend), so its outputs are bit-identical to that server.
* **s2o** — some sequence reaches ``--s2o-min-length`` with a tau above 0: the WHOLE batch runs through
  ``sgl_slim.attention.s2o_attention_paged``, one launch per tau: the long sequences with the server's tau,
  those whose requests sent their own ``s2o_tau`` one launch per value, and the short or dense-by-request ones
  with tau 0 (dense attention, equal to the stock backend up to summation order: stock backends plan whole
  batches, so a dense sequence sharing a batch with a sparse one is not split off to them). Without
  per-request settings that is at most two launches.
  With ``--s2o-calibration`` every KV head runs with its own tau and the file's S2O variant; a layer whose
  calibrated taus are all 0 runs through the stock backend even in such a batch.

Per batch the host work (lengths, index arrays, indptr lists) is done once in ``init_forward_metadata``;
layers only launch kernels. The density each request achieved (mean over layers) is logged per forward and
accumulated in :data:`STATS`.

Anything S2O cannot serve exactly (head dim, dtype, sliding windows, cross-attention, encoder-only,
logit capping, attention sinks, speculative verification, prefill CUDA graphs) raises :class:`ConfigError`
naming the flag to change, at startup where the model config tells, otherwise at the first forward of the
layer.
"""

from __future__ import annotations

import argparse
import enum
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from sgl_slim.attention.s2o_ref import FP8_KV
from sgl_slim.config import ConfigError, S2OConfig, SlimConfig

logger = logging.getLogger("sgl_slim.s2o")

BACKEND_NAME = "s2o"
GPU_HEAD_DIMS = (64, 128)
GPU_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_QUERY_DTYPES = (torch.float16, torch.bfloat16)     # model dtypes that can read an fp8 KV cache

HOOKED_SYMBOLS: list[str] = [
    "sglang.srt.layers.attention.attention_registry.ATTENTION_BACKENDS",
    "sglang.srt.arg_groups.choices.ATTENTION_BACKEND_CHOICES",
    "sglang.srt.layers.attention.base_attn_backend.AttentionBackend",
    "sglang.srt.layers.attention.base_attn_backend.AttentionBackend.init_cuda_graph_state",
    "sglang.srt.layers.attention.hybrid_attn_backend.HybridAttnBackend",
    "sglang.srt.layers.radix_attention.AttentionType",
    "sglang.srt.mem_cache.memory_pool.KVWriteLoc",
    "sglang.srt.model_executor.forward_batch_info.ForwardMode",
    "sglang.srt.runtime_context.get_spec",
    "sglang.srt.runtime_context.get_exec",
    "sglang.srt.runtime_context.get_parallel",
]

# Forward modes (ForwardMode names) the S2O backend computes; DECODE / IDLE go to the decode backend.
SERVED_MODES = ("EXTEND", "MIXED")

# Keyword arguments RadixAttention may pass to forward_extend that S2O can honour (none of them change the
# math). Anything else with a value (attention sinks, ...) is refused by check_kwargs.
HARMLESS_KWARGS: frozenset[str] = frozenset()

# Messages shared by the launcher and the backend (each refusal is written once).
MSG_PREFILL_ONLY = (f"'{BACKEND_NAME}' serves prefill only; choose a stock decode backend (torch_native on CPU; "
                 f"flashinfer, fa3 or triton on GPU)")
MSG_NO_VERIFY = "S2O cannot run speculative target verification (tree masks); pass --speculative-attention-mode decode"
MSG_NO_DLLM = "S2O serves causal prefill only; drop --s2o or --dllm-algorithm"
MSG_NO_PREFILL_GRAPH = ("S2O decides its sparsity on the fly and cannot run inside a captured prefill CUDA graph; "
                     "drop --cuda-graph-backend-prefill (the launcher passes --disable-prefill-cuda-graph)")

_state: dict = {"config": S2OConfig()}
_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------------
# Checks of the serving mode, shared by the launcher (flags) and the backend (resolved arguments)
# ----------------------------------------------------------------------------------------------------

def check_serving_mode(*, decode_backend: str | None, speculative: bool, speculative_attention_mode: str | None,
                       dllm_algorithm: str | None) -> None:
    """Refuse the serving modes S2O cannot take part in. The single place these rules are written."""
    if decode_backend == BACKEND_NAME:
        raise ConfigError("--decode-attention-backend", MSG_PREFILL_ONLY)
    if speculative and speculative_attention_mode != "decode":
        raise ConfigError("--speculative-attention-mode", MSG_NO_VERIFY)
    if dllm_algorithm:
        raise ConfigError("--dllm-algorithm", MSG_NO_DLLM)


def check_forward_mode(mode) -> None:
    """A batch mode (SGLang's ForwardMode) reaching the S2O backend: EXTEND / MIXED only."""
    if mode.is_decode_or_idle():
        raise ConfigError("--decode-attention-backend", MSG_PREFILL_ONLY)
    if mode.is_target_verify():
        raise ConfigError("--speculative-attention-mode", MSG_NO_VERIFY)
    if mode.name not in SERVED_MODES:
        raise ConfigError("--s2o", f"S2O serves {' / '.join(SERVED_MODES)} batches, got {mode.name}; drop --s2o "
                                   f"for this serving mode")


def check_kwargs(layer_id: int, kwargs: dict) -> None:
    unknown = {key for key, val in kwargs.items() if val is not None} - HARMLESS_KWARGS
    if unknown:
        raise ConfigError("--s2o", f"layer {layer_id} passes {sorted(unknown)} (e.g. attention sinks), which S2O "
                                   f"does not implement; drop --s2o")


# ----------------------------------------------------------------------------------------------------
# Launcher side
# ----------------------------------------------------------------------------------------------------

def adjust_server_args(cfg: SlimConfig, args: argparse.Namespace, *, cpu: bool) -> None:
    """Map ``--s2o`` onto SGLang's flags (launcher process, after parsing, before ServerArgs).

    prefill backend -> "s2o"; decode backend -> torch_native on CPU unless the user chose one (on GPU the
    user's ``--decode-attention-backend`` / ``--attention-backend`` or SGLang's default, with its decode CUDA
    graphs); with speculative decoding, ``--speculative-attention-mode decode`` (verification runs on the stock
    decode backend); prefill CUDA graphs off on GPU (S2O's early stop is data dependent). Explicit conflicting
    flags raise ConfigError.
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
    speculative = bool(getattr(args, "speculative_algorithm", None)) or cfg.eagle.enabled
    if speculative and getattr(args, "speculative_attention_mode", "prefill") != "decode":
        logger.info("sgl_slim: --s2o with speculative decoding: --speculative-attention-mode decode (target "
                    "verification and draft extends run on the stock decode backend)")
        args.speculative_attention_mode = "decode"
    check_serving_mode(decode_backend=getattr(args, "decode_attention_backend", None), speculative=speculative,
                       speculative_attention_mode=getattr(args, "speculative_attention_mode", None),
                       dllm_algorithm=getattr(args, "dllm_algorithm", None))
    args.prefill_attention_backend = BACKEND_NAME
    if cpu and not getattr(args, "decode_attention_backend", None) and not getattr(args, "attention_backend", None):
        args.decode_attention_backend = "torch_native"
    if not cpu:
        chosen = getattr(args, "cuda_graph_backend_prefill", None)
        if chosen not in (None, "disabled"):
            raise ConfigError("--cuda-graph-backend-prefill", f"{MSG_NO_PREFILL_GRAPH}; got {chosen}")
        args.disable_prefill_cuda_graph = True
        if getattr(args, "chunked_prefill_size", None) is None:
            # measured (H200, benchmarks/testbed.md): each prefill chunk pays S2O's index and launches once per
            # layer, so 128K prompts ran 1.26x faster (v4) with 32K chunks than with SGLang's 8K; not set here because
            # SGLang reserves activation memory per chunk token (a smaller KV pool)
            logger.info("sgl_slim: --s2o on long prompts: a larger --chunked-prefill-size (e.g. 32768) lowers their "
                        "latency where the memory allows (benchmarks/testbed.md)")


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
    from sgl_slim.integration.s2o_attn_backend import S2OAttnBackend  # noqa: PLC0415 (imports SGLang)
    return S2OAttnBackend.from_runner(runner, _state["config"])


# ----------------------------------------------------------------------------------------------------
# Taus: one float per layer, or calibrated per layer and KV head
# ----------------------------------------------------------------------------------------------------

def check_calibration(calibration, cfg: S2OConfig, *, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
    """The ``--s2o-calibration`` file must fit the served model (its block / segment size were checked against
    the flags when the configuration was validated: S2OConfig.load_calibration)."""
    try:
        calibration.check_model(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
    except ValueError as exc:
        raise ConfigError("--s2o-calibration", f"{cfg.calibration}: {exc}") from exc


def local_kv_heads(total: int, tp_rank: int, tp_size: int) -> tuple[int, ...]:
    """The global KV heads a tensor-parallel rank holds (SGLang's QKVParallelLinear: split when there are at
    least as many heads as ranks, else each head replicated on tp_size / total consecutive ranks)."""
    if total >= tp_size:
        n = total // tp_size
        return tuple(range(tp_rank * n, (tp_rank + 1) * n))
    return (tp_rank // (tp_size // total),)


@dataclass(frozen=True)
class LayerTaus:
    """The taus each attention layer runs with: ``--s2o-tau`` everywhere, or a calibration's per layer and
    KV head (this rank's heads only).

    ``rows[l]`` holds layer l's taus as passed to the kernel: one per local KV head when the attention API
    takes per-head taus; otherwise one value, the SMALLEST of the layer's heads, so that every head stays
    within the error budget it was calibrated for (a smaller tau stops later) at some loss of sparsity.
    """
    default: float
    rows: tuple[tuple[float, ...], ...] | None = None   # [num_layers][1 or local KV heads]; None: ``default``
    variant: str | None = None                          # the calibration's S2O variant; None: the API's default

    @classmethod
    def from_config(cls, cfg: S2OConfig, calibration=None, *,
                    kv_heads: tuple[int, ...] | None = None) -> "LayerTaus":
        if calibration is None:
            return cls(default=cfg.tau, variant=cfg.variant)
        heads = kv_heads if kv_heads is not None else tuple(range(calibration.num_kv_heads))
        rows = []
        for layer in range(calibration.num_layers):
            taus = tuple(calibration.layer_tau(layer)[h] for h in heads)
            rows.append(taus)
        return cls(default=cfg.tau, rows=tuple(rows), variant=calibration.variant)

    def tau(self, layer_id: int) -> float | tuple[float, ...]:
        """A float when the layer's heads share one tau, else one per local KV head."""
        if self.rows is None:
            return self.default
        row = self.rows[layer_id]
        return row[0] if len(set(row)) == 1 else row

    def dense(self, layer_id: int) -> bool:
        """Every head of the layer has tau 0: the layer is exactly dense attention."""
        return self.default == 0 if self.rows is None else not any(self.rows[layer_id])

    @property
    def all_dense(self) -> bool:
        """Every layer is dense: S2O would compute exactly dense attention, so the stock backend does."""
        return self.default == 0 if self.rows is None else not any(any(row) for row in self.rows)

    @property
    def any_dense_layer(self) -> bool:
        return self.default == 0 if self.rows is None else any(not any(row) for row in self.rows)

    def describe(self) -> str:
        if self.rows is None:
            return f"tau={self.default:g}"
        flat = [t for row in self.rows for t in row]
        return f"tau=calibrated ({min(flat):g}..{max(flat):g})"


# ----------------------------------------------------------------------------------------------------
# The per-batch plan: which backend, which rows and which token slots each launch reads
# (pure torch, unit-tested without SGLang)
# ----------------------------------------------------------------------------------------------------

class Route(enum.Enum):
    STOCK = "stock"     # the whole batch through the stock prefill backend (dense, bit-identical to no --s2o)
    S2O = "s2o"         # the whole batch through s2o_attention_paged


class DenseReason(enum.Enum):
    """Why a sequence got dense attention (the wording of its log line)."""
    NONE = ""
    TAU_ZERO = "dense (--s2o-tau 0)"
    SHORT = "dense (kv_len < --s2o-min-length {min_length})"
    REQUEST = "dense (the request's sgl_slim settings)"


@dataclass(frozen=True)
class LaunchGroup:
    """One ``s2o_attention_paged`` call: a subset of the batch's sequences sharing one tau."""
    sparse: bool                    # False: tau = 0 because every sequence is shorter than min_length
    seq_ids: tuple[int, ...]        # positions in the forward batch
    q_rows: torch.Tensor | None     # [Tq_group] int64 rows of the batch's q (None: all rows, in order)
    qo_indptr: torch.Tensor         # [n+1] int32, on the pool's device
    kv_indptr: torch.Tensor         # [n+1] int32, on the pool's device
    kv_indices: torch.Tensor        # [sum kv_len] token slots, per sequence in position order
    qo_indptr_host: tuple[int, ...]   # the same offsets on the host (read once per batch, never per layer)
    kv_indptr_host: tuple[int, ...]
    tau: float | None = None        # a sparse group's tau from its requests' settings; None: the layer's tau
    # per batch: the attention API's launch plan and the device copy of seq_ids, made at the first layer
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def launch_plan(self, block_size: int, segment_size: int, device):
        """The attention API's ``plan_paged`` for this group (built once, then reused by every layer)."""
        key = (block_size, segment_size)
        if key not in self.cache:
            from sgl_slim.attention import plan_paged  # noqa: PLC0415
            self.cache[key] = plan_paged(self.qo_indptr_host, self.kv_indptr_host, block_size=block_size,
                                         segment_size=segment_size, device=device)
            self.cache["seq_ids"] = torch.tensor(self.seq_ids, dtype=torch.int64).to(device, non_blocking=True)
        return self.cache[key], self.cache["seq_ids"]


@dataclass(frozen=True)
class S2OBatchPlan:
    """Everything shape-only about one forward batch, built once in init_forward_metadata."""
    route: Route
    groups: tuple[LaunchGroup, ...]     # empty for Route.STOCK
    seq_lens: tuple[int, ...]           # kv length per sequence (prefix + new)
    extend_lens: tuple[int, ...]        # new (query) tokens per sequence
    reasons: tuple[DenseReason, ...]    # per sequence: why it is dense (NONE: served sparse)
    rids: tuple[str, ...] | None
    seq_taus: tuple[float | None, ...] | None = None   # per sequence: its request's own tau (None: the server's)

    @property
    def own_taus(self) -> bool:
        """Some sparse group runs with a request's own tau (a layer dense by the server's taus is not dense
        for it)."""
        return any(g.sparse and g.tau is not None for g in self.groups)

    @property
    def sparse(self) -> tuple[bool, ...]:
        return tuple(r is DenseReason.NONE for r in self.reasons)


def _ranges(starts: torch.Tensor, lens: list[int], total: int) -> torch.Tensor:
    """Concatenation of arange(starts[i], starts[i] + lens[i]) as int64, without a Python loop."""
    lens_t = torch.tensor(lens, dtype=torch.int64, device=starts.device)
    offsets = torch.cumsum(lens_t, 0) - lens_t                                  # [n] exclusive prefix sums
    base = torch.repeat_interleave(starts.long() - offsets, lens_t, output_size=total)
    return base + torch.arange(total, dtype=torch.int64, device=starts.device)


def _offsets(lens: list[int]) -> tuple[int, ...]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return tuple(out)


def build_launch_groups(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: list[int],
                        extend_lens: list[int], *, min_length: int,
                        seq_taus: list[float | None] | None = None) -> tuple[LaunchGroup, ...]:
    """Split a batch into launches: sparse (kv_len >= min_length) with the server's tau, then one per request
    tau in ``seq_taus`` (per sequence: None = the server's, 0 = dense), then dense (shorter, or tau 0). Without
    ``seq_taus``: at most two launches.

    req_to_token:     [max_reqs, max_context] token slot of position p of request row r.
    req_pool_indices: [B] request rows of the batch (device tensor).
    seq_lens:         [B] kv length of each sequence (cached prefix + new tokens).
    extend_lens:      [B] new tokens of each sequence; they are its LAST positions and sit packed in q
                      in batch order.
    """
    _check_lengths(req_pool_indices, seq_lens, extend_lens)
    own = list(seq_taus) if seq_taus is not None else [None] * len(seq_lens)
    keys = [None if n < min_length or tau == 0 else ("tau", tau) for n, tau in zip(seq_lens, own)]
    return _build_groups(req_to_token, req_pool_indices, seq_lens, extend_lens, keys)


def _build_groups(req_to_token, req_pool_indices, seq_lens, extend_lens, keys) -> tuple[LaunchGroup, ...]:
    """One launch per distinct key (in order: the server's tau ``("tau", None)``, the requests' own taus in
    order of appearance, then None: dense)."""
    device = req_to_token.device
    q_starts = _offsets(extend_lens)[:-1]
    order = sorted({key for key in keys if key is not None}, key=lambda key: (key[1] is not None, keys.index(key)))
    groups = []
    for key in [*order, None]:
        ids = [b for b, k in enumerate(keys) if k == key]
        if not ids:
            continue
        sparse, tau = key is not None, None if key is None else key[1]
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
        qo_host, kv_host = _offsets(q_lens), _offsets(kv_lens)
        groups.append(LaunchGroup(sparse=sparse, seq_ids=tuple(ids), q_rows=q_rows,
                                  qo_indptr=torch.tensor(qo_host, dtype=torch.int32, device=device),
                                  kv_indptr=torch.tensor(kv_host, dtype=torch.int32, device=device),
                                  kv_indices=kv_indices, qo_indptr_host=qo_host, kv_indptr_host=kv_host, tau=tau))
    return tuple(groups)


def _check_lengths(req_pool_indices: torch.Tensor, seq_lens: list[int], extend_lens: list[int]) -> None:
    if len(seq_lens) != len(extend_lens) or len(seq_lens) != req_pool_indices.shape[0]:
        raise ValueError(f"batch of {req_pool_indices.shape[0]} requests but {len(seq_lens)} seq lens and "
                         f"{len(extend_lens)} extend lens")
    for b, (kv_len, q_len) in enumerate(zip(seq_lens, extend_lens)):
        if not 0 <= q_len <= kv_len:
            raise ValueError(f"sequence {b}: {q_len} new tokens but kv length {kv_len}")


def plan_batch(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: list[int],
               extend_lens: list[int], *, taus: LayerTaus, min_length: int,
               rids: tuple[str, ...] | None = None,
               seq_taus: tuple[float | None, ...] | None = None) -> S2OBatchPlan:
    """Route a batch (see the module docstring) and, for S2O, build its launch groups. Host lists in, once.

    ``seq_taus``: per sequence, its request's own tau (``sgl_slim.request_settings``: 0 for ``s2o`` false),
    None for the server's; a sequence with its own tau >= 0 ignores ``--s2o-tau`` (a server at tau 0 still runs
    it sparse), never ``--s2o-min-length``."""
    _check_lengths(req_pool_indices, seq_lens, extend_lens)
    if seq_taus is not None:
        if len(seq_taus) != len(seq_lens):
            raise ValueError(f"{len(seq_taus)} per-request taus for a batch of {len(seq_lens)} sequences")
        if taus.rows is None:      # a request asking for the server's own (sparse) tau runs in its launch
            seq_taus = tuple(None if t == taus.default and t != 0 else t for t in seq_taus)
        if all(t is None for t in seq_taus):
            seq_taus = None
    own = seq_taus if seq_taus is not None else (None,) * len(seq_lens)
    reasons = []
    for n, tau in zip(seq_lens, own):
        if tau == 0:
            reasons.append(DenseReason.REQUEST)
        elif tau is None and taus.all_dense:
            reasons.append(DenseReason.TAU_ZERO)
        else:
            reasons.append(DenseReason.SHORT if n < min_length else DenseReason.NONE)
    reasons = tuple(reasons)
    if all(r is not DenseReason.NONE for r in reasons):
        return S2OBatchPlan(route=Route.STOCK, groups=(), seq_lens=tuple(seq_lens),
                            extend_lens=tuple(extend_lens), reasons=reasons, rids=rids, seq_taus=seq_taus)
    keys = [("tau", tau) if r is DenseReason.NONE else None for r, tau in zip(reasons, own)]
    groups = _build_groups(req_to_token, req_pool_indices, seq_lens, extend_lens, keys)
    return S2OBatchPlan(route=Route.S2O, groups=groups, seq_lens=tuple(seq_lens), extend_lens=tuple(extend_lens),
                        reasons=reasons, rids=rids, seq_taus=seq_taus)


def run_s2o_layer(plan: S2OBatchPlan, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, *,
                  tau: float | torch.Tensor, block_size: int, segment_size: int, sm_scale: float,
                  variant: str | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                  audit_last: int | None = None, audit_form: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of a Route.S2O batch: one ``s2o_attention_paged`` launch per group, with the group's launch
    plan (built at the first layer), so a layer reads nothing back from the device.

    q: [T, Hq, D] the batch's queries; k_pool, v_pool: [slots, Hkv, D] (the new tokens already written).
    tau: a float, or [Hkv] one per KV head (host tensor), for groups without their own tau (``g.tau``: a
    request's, used instead); variant: None for the API's default; k_scale / v_scale: an fp8 cache's scales;
    audit_last: v5's audited last positions, audit_form: how the kernel audits (None: the API's defaults).
    Returns out [T, Hq, D] and the density of each sequence of the batch, fp64 [B] on q's device (1.0 for the
    dense group): the caller reads the layers' sum once per batch.
    """
    from sgl_slim.attention import s2o_attention_paged  # noqa: PLC0415 (keeps this module's import light)

    out = None if len(plan.groups) == 1 and plan.groups[0].q_rows is None else torch.empty_like(q)
    densities = torch.ones(len(plan.seq_lens), dtype=torch.float64, device=q.device)
    extra = {} if variant is None else {"variant": variant}
    if audit_last is not None:
        extra["audit_last"] = audit_last
    if audit_form is not None:
        extra["audit_form"] = audit_form
    for g in plan.groups:
        launch_plan, seq_ids = g.launch_plan(block_size, segment_size, q.device)
        q_g = q if g.q_rows is None else q.index_select(0, g.q_rows)
        o_g, (computed, causal) = s2o_attention_paged(
            q_g, k_pool, v_pool, qo_indptr=g.qo_indptr, kv_indptr=g.kv_indptr, kv_indices=g.kv_indices,
            tau=(tau if g.tau is None else g.tau) if g.sparse else 0.0, block_size=block_size,
            segment_size=segment_size, sm_scale=sm_scale, plan=launch_plan, return_counts=True, k_scale=k_scale,
            v_scale=v_scale, **extra)
        if g.q_rows is None:
            out = o_g
        else:
            out.index_copy_(0, g.q_rows, o_g)
        dens = computed.sum(1).double() / causal.sum(1).clamp(min=1).double()
        densities.index_copy_(0, seq_ids, dens.to(densities.device))
    return out, densities


# ----------------------------------------------------------------------------------------------------
# Per-process statistics (the metrics work exports these)
# ----------------------------------------------------------------------------------------------------

@dataclass
class S2OStats:
    """Achieved densities in this process. ``density`` is weighted by causal (query, key) pairs."""
    forwards: int = 0
    sparse_chunks: int = 0          # (request, forward) pairs served sparse
    dense_chunks: int = 0           # ... served dense (tau 0, or kv_len < min_length)
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
# Startup and first-use checks: refuse what S2O cannot serve exactly, naming the flag to change
# ----------------------------------------------------------------------------------------------------

def check_kv_cache_dtype(model_dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    """S2O reads a KV cache in the model's dtype or, for a bf16 / fp16 model, an fp8 one (with its scales)."""
    if cache_dtype != model_dtype and not (cache_dtype in FP8_KV and model_dtype in FP8_QUERY_DTYPES):
        raise ConfigError("--kv-cache-dtype", f"S2O reads a KV cache in the model dtype ({model_dtype}) or, for a "
                                              f"bf16 / fp16 model, in fp8 (fp8_e4m3, fp8_e5m2); this one is "
                                              f"{cache_dtype}; use --kv-cache-dtype auto or fp8_e4m3")


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
    check_kv_cache_dtype(dtype, runner.kv_cache_dtype)
    head_dim = getattr(mc, "head_dim", None)
    if not cpu and head_dim not in GPU_HEAD_DIMS:
        raise ConfigError("--s2o", f"the Triton kernel supports head dims {GPU_HEAD_DIMS}, this model has "
                                   f"{head_dim}; drop --s2o")
    spec = get_spec()
    check_serving_mode(decode_backend=getattr(runner, "decode_attention_backend_str", None),
                       speculative=spec.speculative_algorithm is not None,
                       speculative_attention_mode=spec.speculative_attention_mode,
                       dllm_algorithm=get_exec().dllm.dllm_algorithm)


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
    if (layer.k_scale is None) != (layer.v_scale is None):
        raise ConfigError("--kv-cache-dtype", f"{where} has a scale for only one of K and V; S2O reads an fp8 "
                                              f"cache with both (or neither); use --kv-cache-dtype auto")
