"""Per-request records and the summary statistics of a benchmark run (plain Python, no server needed).

Definitions (the same as SGLang's ``bench_serving``):
- TTFT: request sent -> first streamed chunk with content.
- ITL (inter-token latency): gaps between successive content chunks of one request, pooled over requests.
  SGLang streams one token per chunk by default (``--stream-interval 1``); with a larger interval a gap spans
  several tokens.
- TPOT: (latency - TTFT) / (completion tokens - 1), per request with at least 2 completion tokens.
- Output tok/s and req/s: totals over the wall time of the whole run (first send -> last response).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class RequestResult:
    kind: str                      # scenario of this request: text, longctx, image, audio
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0         # from the server's usage report (after any pruning of media tokens)
    completion_tokens: int = 0
    ttft_s: float = math.nan
    latency_s: float = math.nan
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each content chunk, from send
    finish_reason: str | None = None
    text: str = ""

    def itl_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    def tpot_s(self) -> float:
        if self.completion_tokens < 2:
            return math.nan
        return (self.latency_s - self.ttft_s) / (self.completion_tokens - 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("chunk_times_s")
        d["itl_s"] = self.itl_s()
        return d


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default method).
    NaN for an empty list."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """Summary of one run. Latencies in milliseconds; failed requests count in ``failed`` only."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1e3 for r in ok]
    itl = [g * 1e3 for r in ok for g in r.itl_s()]
    tpot = [r.tpot_s() * 1e3 for r in ok if r.completion_tokens >= 2]
    lat = [r.latency_s * 1e3 for r in ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    summary = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "req_per_s": len(ok) / duration_s,
        "output_tok_per_s": out_tokens / duration_s,
        "total_tok_per_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration_s,
        "prompt_tokens_mean": mean([r.prompt_tokens for r in ok]),
        "completion_tokens_mean": mean([r.completion_tokens for r in ok]),
        "latency_ms_mean": mean(lat),
    }
    for name, xs in (("ttft_ms", ttft), ("itl_ms", itl), ("tpot_ms", tpot)):
        summary[f"{name}_mean"] = mean(xs)
        for q in (50, 90, 99):
            summary[f"{name}_p{q}"] = percentile(xs, q)
    kinds = sorted({r.kind for r in results})
    summary["prompt_tokens_mean_by_kind"] = {
        k: mean([r.prompt_tokens for r in ok if r.kind == k]) for k in kinds}
    summary["errors"] = sorted({r.error for r in results if not r.ok})[:10]
    return summary
