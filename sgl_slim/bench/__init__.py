"""``python -m sgl_slim.bench``: serving benchmark of an sgl_slim (or any OpenAI-compatible SGLang) server.

Public API: ``build_workload`` (seeded requests), ``run_workload`` (async, streaming, concurrency cap and
Poisson arrivals), ``summarize`` / ``percentile`` (statistics), ``LaunchedServer`` (start/stop a server),
``main`` (the command line).
"""

from sgl_slim.bench.stats import RequestResult, percentile, summarize
from sgl_slim.bench.workload import SCENARIOS, BenchRequest, WorkloadSpec, build_workload

__all__ = ["SCENARIOS", "BenchRequest", "RequestResult", "WorkloadSpec", "build_workload", "percentile",
           "summarize", "main"]


def main(argv=None):
    from sgl_slim.bench.cli import main as _main  # noqa: PLC0415 (keeps `import sgl_slim.bench` light)
    return _main(argv)
