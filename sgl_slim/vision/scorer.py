"""Optional trained importance scorer for IDPruner (``--idpruner-scorer DIR``), VisionSelector-style:
a small MLP from each merged vision embedding to one importance logit.

Directory layout:
    config.json          {"type": "idpruner_scorer", "hidden_size": D, "intermediate_size": H}
                         (H = 0: a single linear layer)
    scorer.safetensors   H > 0: fc1.weight [H, D], fc1.bias [H], fc2.weight [1, H], fc2.bias [1]
                         H = 0: fc.weight [1, D], fc.bias [1]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "scorer.safetensors"


class ImportanceScorer(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        if intermediate_size > 0:
            self.fc1 = nn.Linear(hidden_size, intermediate_size)
            self.fc2 = nn.Linear(intermediate_size, 1)
        else:
            self.fc = nn.Linear(hidden_size, 1)

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, D] -> importance [N] (fp32)."""
        if features.dim() != 2 or features.shape[1] != self.hidden_size:
            raise ValueError(f"idpruner scorer: expects features [N, {self.hidden_size}], got "
                             f"{tuple(features.shape)}")
        p = next(self.parameters())
        x = features.to(device=p.device, dtype=p.dtype)
        if self.intermediate_size > 0:
            out = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        else:
            out = self.fc(x)
        return out[:, 0].float()


def save_scorer(scorer: ImportanceScorer, directory: str | Path) -> Path:
    from safetensors.torch import save_file  # noqa: PLC0415

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps({
        "type": "idpruner_scorer", "hidden_size": scorer.hidden_size,
        "intermediate_size": scorer.intermediate_size}))
    save_file({k: v.contiguous() for k, v in scorer.state_dict().items()}, str(directory / WEIGHTS_NAME))
    return directory


def load_scorer(directory: str | Path, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> ImportanceScorer:
    """Load a scorer directory; errors name the file and what is wrong."""
    from safetensors.torch import load_file  # noqa: PLC0415

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"--idpruner-scorer {directory}: needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--idpruner-scorer {cfg_path}: not valid JSON ({exc})") from exc
    if cfg.get("type") != "idpruner_scorer" or not isinstance(cfg.get("hidden_size"), int):
        raise ValueError(f"--idpruner-scorer {cfg_path}: want type 'idpruner_scorer' and an int hidden_size, "
                         f"got {cfg}")
    scorer = ImportanceScorer(cfg["hidden_size"], int(cfg.get("intermediate_size", 0)))
    state = load_file(str(w_path))
    missing, unexpected = scorer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"--idpruner-scorer {w_path}: missing tensors {missing}, unexpected {unexpected}")
    return scorer.to(device=device, dtype=dtype).eval()
