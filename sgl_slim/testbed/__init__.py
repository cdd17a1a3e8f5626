"""A long-context Llama-architecture model trained here: the yardstick for sparse prefill attention.

    python -m sgl_slim.testbed.train --out DIR             # train (GPU; resumable; loss curve in DIR)
    python -m sgl_slim.testbed.eval --model DIR            # held-out loss + retrieval, dense vs sparse methods
    python -m sgl_slim.testbed.dump --model DIR            # per-layer q/k/v of one long prompt, head statistics
    python -m sgl_slim.calibrate --model DIR --error-budget 0.01   # per-layer/per-KV-head S2O taus
    python -m sgl_slim.testbed.pipeline --out DIR          # all of the above in one GPU call

Modules: ``model`` (the config and its checks), ``data`` (real text + synthetic retrieval tasks),
``attn`` (replacing every layer's prefill attention by a method), ``train``, ``eval``, ``dump``.
Never imports sglang; runs on a machine with torch, transformers and tokenizers only.
"""

import json
from pathlib import Path


def append_jsonl(path, rows) -> None:
    """Append ``rows`` (dicts) to the JSON-lines file ``path``."""
    with Path(path).open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
