"""``--eagle-draft``: SGLang's own EAGLE-3 worker, same flags on GPU and CPU.

On a GPU this module only maps sgl_slim's flags onto SGLang's (:func:`adjust_server_args`). On a CPU
(``SGLANG_USE_CPU_ENGINE=1``) stock SGLang 0.5.23 refuses EAGLE ("not supported in decode attention backend
torch_native") and lacks the speculative ``sgl_kernel`` CPU ops; :func:`install` supplies the missing pieces,
no SGLang file changed:

1. pure-torch ``torch.ops.sgl_kernel.*_cpu`` ops, ports of SGLang's Triton kernels (``sgl_slim.standins.spec_ops``);
2. AROUND hooks on ``DraftBackendFactory.create_decode_backend`` / ``create_draft_extend_backend``: for
   ``torch_native`` they return a multi-step torch_native draft backend (draft step i attends to
   ``seq_lens + i + 1`` tokens) and a plain ``TorchNativeAttnBackend``;
3. an AROUND hook on ``TorchNativeAttnBackend.forward_extend`` for TARGET_VERIFY, whose batches carry no
   extend lengths: each request's draft tokens attend to its prefix and, among themselves, causally
   (chain) or through ``spec_info.custom_mask`` (trees, QLEN_ONLY layout).

Why this route rather than an algorithm of our own: the EAGLE3 name is reserved for the built-in worker
(``spec_registry.py``), so a registered algorithm would need different command lines on CPU and GPU; and
SGLang's own worker, scheduler accounting and metrics (``spec_accept_length``, ``spec_num_correct_drafts``,
``spec_num_proposed_drafts`` in each response's meta_info; "accept len" in the decode log) stay unchanged.
Limits on CPU: chain drafting only (``--speculative-eagle-topk 1``); verification is greedy.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sgl_slim.config import ConfigError, SlimConfig

logger = logging.getLogger(__name__)

HOOKED_SYMBOLS: list[str] = [
    "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_decode_backend",
    "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_draft_extend_backend",
    "sglang.srt.speculative.draft_utils.DraftBackendFactory._create_backend",
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_decode",
    "sglang.srt.layers.attention.attention_registry.attn_backend_wrapper_for_draft_extend",
    "sglang.srt.runtime_context.attention_backends",
    "sglang.srt.runtime_context.get_spec",
    "sglang.srt.mem_cache.memory_pool.KVWriteLoc",
    "sglang.srt.utils.common.is_cpu",
    "sglang.srt.plugins.hook_registry.HookRegistry.register",
]

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"
_INSTALLED = False


# ---- launcher side ----------------------------------------------------------------------------------------
def check_draft_fits(draft_dir: str | Path, target_dir: str | Path) -> None:
    """Raise ConfigError('--eagle-draft', ...) unless the draft's config matches the target's (JSON only)."""
    from sgl_slim.spec.textlm import TextConfig  # noqa: PLC0415 (pure torch, no sglang)

    draft_dir, target_dir = Path(draft_dir), Path(target_dir)
    try:
        draft = json.loads((draft_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("--eagle-draft", f"cannot read {draft_dir}/config.json: {e}") from e
    if EAGLE3_ARCHITECTURE not in (draft.get("architectures") or []):
        raise ConfigError("--eagle-draft", f"{draft_dir} is not an EAGLE-3 draft: architectures "
                                           f"{draft.get('architectures')} (expected [{EAGLE3_ARCHITECTURE!r}])")
    target_config = target_dir / "config.json"
    if not target_config.is_file():
        return      # a hub id or remote path: SGLang resolves and checks it later
    target = TextConfig.from_hf(json.loads(target_config.read_text()))
    problems = []
    if draft.get("vocab_size") != target.vocab_size:
        problems.append(f"vocab_size {draft.get('vocab_size')} != target's {target.vocab_size}")
    draft_vocab = draft.get("draft_vocab_size") or draft.get("vocab_size")
    if draft_vocab and draft_vocab > target.vocab_size:
        problems.append(f"draft_vocab_size {draft_vocab} > target's vocab_size {target.vocab_size}")
    target_hidden = draft.get("target_hidden_size", draft.get("hidden_size"))
    if target_hidden != target.hidden_size:
        problems.append(f"target_hidden_size {target_hidden} != target's hidden_size {target.hidden_size}")
    if draft.get("hidden_size") != target.hidden_size and not _has_own_embedding(draft_dir):
        problems.append(f"hidden_size {draft.get('hidden_size')} != target's {target.hidden_size} and the "
                        "draft carries no embed_tokens.weight of its own")
    layer_ids = ((draft.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")) or []
    bad = [i for i in layer_ids if not 0 <= i <= target.num_layers - 2]
    if bad:
        problems.append(f"eagle_aux_hidden_state_layer_ids {bad} outside 0..{target.num_layers - 2} "
                        f"(target has {target.num_layers} layers)")
    if problems:
        raise ConfigError("--eagle-draft", f"draft {draft_dir} does not fit target {target_dir}: "
                                           + "; ".join(problems) + ". Train a draft for this target "
                                           "(python -m sgl_slim.spec.train --target ... --out ...)")


def _has_own_embedding(draft_dir: Path) -> bool:
    from safetensors import safe_open  # noqa: PLC0415

    for file in draft_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            if any(k.endswith("embed_tokens.weight") for k in f.keys()):
                return True
    return False


def adjust_server_args(cfg: SlimConfig, args: argparse.Namespace, *, cpu: bool) -> None:
    """Map --eagle-draft/--eagle-steps/--eagle-draft-tokens onto SGLang's --speculative-* flags.

    Same flags on GPU and CPU (chain drafting, topk 1). Validates that the draft fits the target first.
    A --speculative-* flag the user set to a different value is a conflict (ConfigError naming both).
    """
    eagle = cfg.eagle
    if not eagle.enabled:
        return
    if eagle.verified_tokens != eagle.steps + 1:
        raise ConfigError("--eagle-draft-tokens", f"chain drafting verifies --eagle-steps + 1 tokens: with "
                                                  f"--eagle-steps {eagle.steps} use --eagle-draft-tokens "
                                                  f"{eagle.steps + 1}, got {eagle.draft_tokens}")
    model_path = getattr(args, "model_path", None)
    if model_path:
        check_draft_fits(eagle.draft, model_path)
    wanted = {
        "speculative_algorithm": "EAGLE3",
        "speculative_draft_model_path": str(eagle.draft),
        "speculative_num_steps": eagle.steps,
        "speculative_eagle_topk": 1,
        "speculative_num_draft_tokens": eagle.verified_tokens,
    }
    for name, value in wanted.items():
        current = getattr(args, name, None)
        if current is not None and current != value:
            flag = "--" + name.replace("_", "-")
            raise ConfigError("--eagle-draft", f"conflicts with {flag} {current} (--eagle-draft sets {value}); "
                                               f"drop {flag} or --eagle-draft")
        setattr(args, name, value)
    # On the CPU SGLang itself turns the overlap scheduler off (speculative_hook._disable_overlap_schedule_for_cpu)
    # and the draft inherits the target's torch_native backend; nothing else to set.


# ---- SGLang processes -------------------------------------------------------------------------------------
def install(cfg: SlimConfig) -> None:
    """Register the CPU ops and hooks (CPU engine only; idempotent). GPU: nothing to do."""
    global _INSTALLED
    if _INSTALLED or not cfg.eagle.enabled:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415
    from sglang.srt.utils.common import is_cpu  # noqa: PLC0415

    _INSTALLED = True
    if not is_cpu():
        return
    from sgl_slim.standins import spec_ops  # noqa: PLC0415

    spec_ops.register()
    factory = "sglang.srt.speculative.draft_utils.DraftBackendFactory"
    HookRegistry.register(f"{factory}.create_decode_backend", _create_decode_backend, HookType.AROUND)
    HookRegistry.register(f"{factory}.create_draft_extend_backend", _create_draft_extend_backend, HookType.AROUND)
    HookRegistry.register("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
                          _forward_extend, HookType.AROUND)


def _configured_backend(factory, phase: str) -> str:
    from sglang.srt.runtime_context import attention_backends  # noqa: PLC0415

    prefill, decode = attention_backends()
    return factory.draft_attn_backend or (decode if phase == "decode_attention_backend" else prefill)


def _create_decode_backend(original, self):
    phase = "decode_attention_backend"
    if (self.speculative_num_steps <= 1 or self.qsa_profile is not None
            or _configured_backend(self, phase) != "torch_native"):
        return original(self)
    from sgl_slim.integration.standins.eagle_backends import TorchNativeMultiStepDraftBackend  # noqa: PLC0415

    return self._create_backend(
        phase,
        {"torch_native": lambda: ("torch_native", TorchNativeMultiStepDraftBackend(
            self.draft_model_runner, self.topk, self.speculative_num_steps))},
        "EAGLE is not supported in decode attention backend {backend_type}",
        stamps_children=True,
    )


def _create_draft_extend_backend(original, self):
    from sglang.srt.runtime_context import get_spec  # noqa: PLC0415

    phase = ("decode_attention_backend" if get_spec().speculative_attention_mode == "decode"
             else "prefill_attention_backend")
    if self.qsa_profile is not None or _configured_backend(self, phase) != "torch_native":
        return original(self)
    from sglang.srt.layers.attention.attention_registry import (  # noqa: PLC0415
        attn_backend_wrapper_for_draft_extend,
    )
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: PLC0415

    backend = self._create_backend(
        phase, {"torch_native": lambda: ("torch_native", TorchNativeAttnBackend(self.draft_model_runner))},
        "EAGLE is not supported in attention backend {backend_type}")
    wrapped = attn_backend_wrapper_for_draft_extend(self.draft_model_runner, backend)
    if wrapped is not backend and wrapped is not None:
        wrapped.prefill_attention_backend_str = backend.prefill_attention_backend_str
        wrapped.decode_attention_backend_str = backend.decode_attention_backend_str
    return wrapped


def _forward_extend(original, self, q, k, v, layer, forward_batch, save_kv_cache=True):
    if not forward_batch.forward_mode.is_target_verify():
        return original(self, q, k, v, layer, forward_batch, save_kv_cache)
    from sgl_slim.integration.standins.eagle_backends import forward_target_verify  # noqa: PLC0415

    return forward_target_verify(self, q, k, v, layer, forward_batch, save_kv_cache)
