"""EAGLE-3 drafts trained here for SGLang's speculative decoding. Plain torch; never imports sglang.

Public API:
    TextLM, TextConfig                  the target's language part as a plain-torch decoder (reads and writes
                                        a checkpoint's tensors by name)
    Eagle3Draft, DraftConfig            the draft: one decoder layer on the target's fused hidden states
    export_eagle3(draft, dir), load_eagle3(dir, embed_weight)
                                        SGLang's EAGLE-3 checkpoint format (``LlamaForCausalLMEagle3``)
    speculative_greedy(target, draft, prompt, max_new_tokens, steps)
                                        a chain speculative decoding loop (batch 1, greedy, KV caches)
    AcceptanceStats, simulate_chain, server_accept_length
                                        acceptance statistics, and an offline simulation of SGLang's chain
                                        drafting

Training and the demo target are command lines (``python -m sgl_slim.spec.train``, ``python -m
sgl_slim.spec.target_lm``) and stay out of this namespace: import ``sgl_slim.spec.train.train_draft`` /
``ensure_eagle_draft`` and ``sgl_slim.spec.target_lm.ensure_eagle_target`` from their modules.
The pure-torch ports of SGLang's speculative kernels that its CPU engine needs are stand-ins, in
``sgl_slim.standins.spec_ops`` (registered by ``sgl_slim.integration.eagle``).
"""

from sgl_slim.spec.decode import speculative_greedy
from sgl_slim.spec.draft import DraftConfig, Eagle3Draft
from sgl_slim.spec.export import export_eagle3, load_eagle3
from sgl_slim.spec.metrics import AcceptanceStats, server_accept_length, simulate_chain
from sgl_slim.spec.textlm import TextConfig, TextLM

__all__ = ["AcceptanceStats", "DraftConfig", "Eagle3Draft", "TextConfig", "TextLM", "export_eagle3",
           "load_eagle3", "server_accept_length", "simulate_chain", "speculative_greedy"]
