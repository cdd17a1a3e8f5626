"""Load, CI size: mixed requests at concurrency 8 against both demo servers at once (image server: text and
image requests, IDPruner on; audio server: text and audio, Samp on), two rounds. Zero failures, every response
complete (exactly max_tokens, EOS ignored), the KV pool's tokens in use back to zero, and resident memory
stable between rounds. The full-size run (200 requests, concurrency 16) is benchmarks/serving_load.py."""

import asyncio
import os

import pytest

from sgl_slim.bench.probes import server_rss_bytes, wait_until_idle
from sgl_slim.bench.runner import run_workload
from sgl_slim.bench.workload import WorkloadSpec, build_workload

pytestmark = pytest.mark.e2e

NUM_REQUESTS = int(os.environ.get("SGL_SLIM_LOAD_REQUESTS", "12"))  # per server per round
MAX_TOKENS = 8
SPEC = WorkloadSpec(max_tokens=MAX_TOKENS, audio_seconds=1.0)
RSS_GROWTH_LIMIT = 0.10  # the second round may not add more than 10% to the first round's resident memory


async def _round(servers, seed):
    work = {
        "vl": build_workload("mixed", NUM_REQUESTS, seed=seed, spec=SPEC, mixed_kinds=("text", "image")),
        "audio": build_workload("mixed", NUM_REQUESTS, seed=seed, spec=SPEC, mixed_kinds=("text", "audio")),
    }
    runs = await asyncio.gather(*(run_workload(servers[k].base_url, work[k], concurrency=8, progress=False)
                                  for k in work))
    return {k: results for k, (results, _) in zip(work, runs)}


def test_mixed_load_two_rounds(slim_servers):
    rss = []
    for seed in (0, 1):
        results = asyncio.run(_round(slim_servers, seed))
        for name, res in results.items():
            failed = [(r.kind, r.error) for r in res if not r.ok]
            assert not failed, f"{name}: {len(failed)} failed: {failed[:3]}"
            incomplete = [(r.kind, r.completion_tokens, r.finish_reason) for r in res
                          if r.completion_tokens != MAX_TOKENS or r.finish_reason != "length"]
            assert not incomplete, f"{name}: incomplete responses {incomplete[:3]}"
            assert {r.kind for r in res} == ({"text", "image"} if name == "vl" else {"text", "audio"})
        for name, srv in slim_servers.items():
            load = wait_until_idle(srv.base_url, timeout_s=60)
            assert load["num_used_tokens"] == 0 and load["num_running_reqs"] == 0, f"{name} after load: {load}"
        rss.append({name: server_rss_bytes(srv.base_url) for name, srv in slim_servers.items()})
    for name in slim_servers:
        first, second = rss[0][name], rss[1][name]
        assert first > 0, f"{name}: no listening process found for the RSS check"
        assert second <= first * (1 + RSS_GROWTH_LIMIT), \
            f"{name}: resident memory grew from {first / 2**20:.0f} MiB to {second / 2**20:.0f} MiB"
