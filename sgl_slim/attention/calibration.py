"""Per-layer, per-KV-head S2O thresholds (``--s2o-calibration FILE``): the file format and its checks.

A calibration file is JSON::

    {"format": "sgl_slim.s2o_calibration/1", "model": "meta-llama/Llama-3.1-8B-Instruct",
     "num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "error_budget": 0.02,
     "block_size": 128, "segment_size": 2048, "variant": "v2",
     "taus": [[1e-5, 3e-5, ...], ...],          # [num_layers][num_kv_heads], each >= 0
     "densities": [[0.41, 0.77, ...], ...]}     # optional, same shape, each in [0, 1]

``taus[l][h]`` is the early-stop threshold of KV head ``h`` (after tensor parallel sharding: the global head
index) in attention layer ``l``, found so that the layer's attention output stays within ``error_budget``
(relative L2 against dense) with the block size, segment size and S2O variant recorded beside it.
Plain Python (no torch, no sglang); the serving side reads it through :meth:`S2OCalibration.load`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

FORMAT = "sgl_slim.s2o_calibration/1"

_FIELDS = ("format", "model", "num_layers", "num_kv_heads", "head_dim", "error_budget", "block_size",
           "segment_size", "variant", "taus", "densities")


def _int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def _float(name: str, value, *, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    value = float(value)
    if not (lo <= value <= hi) or math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name}: must be a finite number in [{lo:g}, {hi:g}], got {value!r}")
    return value


def _table(name: str, rows, num_layers: int, num_kv_heads: int, *, hi: float) -> tuple[tuple[float, ...], ...]:
    """A [num_layers][num_kv_heads] table of numbers in [0, hi], as nested tuples."""
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"{name}: must be a list of {num_layers} layers, got {type(rows).__name__}")
    if len(rows) != num_layers:
        raise ValueError(f"{name}: has {len(rows)} layers, num_layers is {num_layers}")
    out = []
    for layer, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise ValueError(f"{name}[{layer}]: must be a list of {num_kv_heads} numbers, got {type(row).__name__}")
        if len(row) != num_kv_heads:
            raise ValueError(f"{name}[{layer}]: has {len(row)} heads, num_kv_heads is {num_kv_heads}")
        out.append(tuple(_float(f"{name}[{layer}][{head}]", x, hi=hi) for head, x in enumerate(row)))
    return tuple(out)


@dataclass(frozen=True)
class S2OCalibration:
    """Calibrated S2O thresholds of one model; validated on construction (ValueError naming the field)."""

    model: str                  # free text: the model path/name it was made for
    num_layers: int
    num_kv_heads: int
    head_dim: int
    error_budget: float         # rel-L2 budget of the attention output per layer
    block_size: int             # the S2O settings the taus are for
    segment_size: int
    variant: str
    taus: tuple[tuple[float, ...], ...]                   # [num_layers][num_kv_heads], each >= 0
    densities: tuple[tuple[float, ...], ...] | None = None  # measured density per layer/head, in [0, 1]

    def __post_init__(self):
        if not isinstance(self.model, str):
            raise ValueError(f"model: must be a string, got {self.model!r}")
        _int("num_layers", self.num_layers)
        _int("num_kv_heads", self.num_kv_heads)
        _int("head_dim", self.head_dim)
        _float("error_budget", self.error_budget)
        _int("block_size", self.block_size)
        _int("segment_size", self.segment_size)
        if self.segment_size % self.block_size:
            raise ValueError(f"segment_size: must be a multiple of block_size ({self.block_size}), "
                             f"got {self.segment_size}")
        if not isinstance(self.variant, str) or not self.variant:
            raise ValueError(f"variant: must be a non-empty string, got {self.variant!r}")
        # normalise lists to tuples so that equal calibrations compare (and hash) equal
        object.__setattr__(self, "taus", _table("taus", self.taus, self.num_layers, self.num_kv_heads,
                                                hi=math.inf))
        if self.densities is not None:
            object.__setattr__(self, "densities", _table("densities", self.densities, self.num_layers,
                                                         self.num_kv_heads, hi=1.0))

    # -- JSON --------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = {"format": FORMAT, "model": self.model, "num_layers": self.num_layers,
             "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "error_budget": self.error_budget,
             "block_size": self.block_size, "segment_size": self.segment_size, "variant": self.variant,
             "taus": [list(row) for row in self.taus]}
        if self.densities is not None:
            d["densities"] = [list(row) for row in self.densities]
        return d

    @classmethod
    def from_json(cls, d) -> "S2OCalibration":
        if not isinstance(d, dict):
            raise ValueError(f"calibration: must be a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"format: must be {FORMAT!r}, got {d.get('format')!r}")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown field (known: {', '.join(_FIELDS)})")
        missing = [name for name in _FIELDS if name not in d and name not in ("format", "densities")]
        if missing:
            raise ValueError(f"{missing[0]}: missing")
        return cls(model=d["model"], num_layers=d["num_layers"], num_kv_heads=d["num_kv_heads"],
                   head_dim=d["head_dim"], error_budget=d["error_budget"], block_size=d["block_size"],
                   segment_size=d["segment_size"], variant=d["variant"], taus=d["taus"],
                   densities=d.get("densities"))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "S2OCalibration":
        """Read and validate a calibration file; ValueError names the file and the field."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON file: {exc}") from exc
        try:
            return cls.from_json(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    # -- use ---------------------------------------------------------------------------------------------
    def check_model(self, *, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """Refuse a model whose attention shape differs from the one the taus were measured on."""
        diffs = [f"{name} {mine} in the file, {theirs} in the model"
                 for name, mine, theirs in (("num_layers", self.num_layers, num_layers),
                                            ("num_kv_heads", self.num_kv_heads, num_kv_heads),
                                            ("head_dim", self.head_dim, head_dim))
                 if mine != theirs]
        if diffs:
            raise ValueError(f"calibration made for {self.model!r} does not fit this model: " + "; ".join(diffs))

    def layer_tau(self, layer: int) -> tuple[float, ...]:
        """The taus of every KV head of attention layer ``layer`` (0-based)."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range: the calibration has {self.num_layers} layers")
        return self.taus[layer]
