"""sgl_slim.bench statistics and workload against hand-computed cases (no server)."""

import math

import pytest

from sgl_slim.bench import RequestResult, build_workload, percentile, summarize
from sgl_slim.bench.cli import format_table


def test_percentile_matches_hand_computed_linear_interpolation():
    xs = [40.0, 10.0, 30.0, 20.0]  # sorted: 10 20 30 40; rank = (n - 1) q / 100
    assert percentile(xs, 0) == 10.0
    assert percentile(xs, 100) == 40.0
    assert percentile(xs, 50) == 25.0           # rank 1.5 -> 20 + 0.5 * 10
    assert percentile(xs, 90) == pytest.approx(37.0)   # rank 2.7 -> 30 + 0.7 * 10
    assert percentile(xs, 99) == pytest.approx(39.7)   # rank 2.97
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q must be in"):
        percentile(xs, 101)


def _req(kind, ttft, chunks, latency, prompt, completion, ok=True):
    return RequestResult(kind=kind, ok=ok, ttft_s=ttft, chunk_times_s=chunks, latency_s=latency,
                         prompt_tokens=prompt, completion_tokens=completion, error="" if ok else "boom")


def test_summary_itl_ttft_tpot_and_throughput_by_hand():
    a = _req("text", 0.100, [0.100, 0.110, 0.130, 0.160], 0.160, prompt=20, completion=4)  # ITL 10, 20, 30 ms
    b = _req("image", 0.300, [0.300, 0.340], 0.340, prompt=86, completion=2)               # ITL 40 ms
    c = _req("image", math.nan, [], 0.5, prompt=0, completion=0, ok=False)
    s = summarize([a, b, c], duration_s=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["errors"] == ["boom"]
    assert s["req_per_s"] == pytest.approx(1.0)
    assert s["output_tok_per_s"] == pytest.approx(3.0)            # (4 + 2) / 2 s
    assert s["total_tok_per_s"] == pytest.approx((6 + 106) / 2.0)
    assert s["ttft_ms_mean"] == pytest.approx(200.0)
    assert s["ttft_ms_p50"] == pytest.approx(200.0)               # [100, 300] -> midpoint
    assert s["ttft_ms_p90"] == pytest.approx(280.0)
    assert s["itl_ms_mean"] == pytest.approx(25.0)                # pooled gaps 10 20 30 40
    assert s["itl_ms_p50"] == pytest.approx(25.0)
    assert s["itl_ms_p99"] == pytest.approx(39.7)
    assert s["tpot_ms_mean"] == pytest.approx((20.0 + 40.0) / 2)  # a: 60 ms / 3, b: 40 ms / 1
    assert s["prompt_tokens_mean"] == pytest.approx(53.0)
    assert s["prompt_tokens_mean_by_kind"] == {"image": 86.0, "text": 20.0}
    with pytest.raises(ValueError, match="duration_s"):
        summarize([a], 0.0)


def test_compare_table_reports_tokens_saved_and_relative_change():
    base = summarize([_req("image", 0.1, [0.1, 0.2], 0.2, 86, 2)], 1.0)
    pruned = summarize([_req("image", 0.05, [0.05, 0.1], 0.1, 38, 2)], 0.5)
    table = format_table([{"label": "off", "scenario": "image", "summary": base},
                          {"label": "on", "scenario": "image", "summary": pruned}])
    assert "| metric | image off | image on | image change |" in table
    assert "| prompt tokens/req | 86.0 | 38.0 | +48.0 saved |" in table
    assert "| req/s | 1.000 | 2.000 | +100.0% |" in table


def test_workload_is_seeded_and_mixed_has_equal_shares():
    w1 = build_workload("mixed", 9, seed=3)
    w2 = build_workload("mixed", 9, seed=3)
    assert [r.messages for r in w1] == [r.messages for r in w2]
    assert sorted(r.kind for r in w1) == ["audio"] * 3 + ["image"] * 3 + ["text"] * 3
    assert [r.messages for r in build_workload("mixed", 9, seed=4)] != [r.messages for r in w1]
    assert build_workload("mixed", 4, mixed_kinds=("text",))[0].kind == "text"
    with pytest.raises(ValueError, match="unknown scenario"):
        build_workload("hologram", 1)


def test_video_workload_sends_decodable_videos():
    import base64
    import io

    decord = pytest.importorskip("decord")
    from sgl_slim.bench.workload import SCENARIOS, WorkloadSpec

    (req,) = build_workload("video", 1, seed=2, spec=WorkloadSpec(video_frames=6))
    part = req.messages[0]["content"][0]
    assert req.kind == "video" and part["type"] == "video_url"
    reader = decord.VideoReader(io.BytesIO(base64.b64decode(part["video_url"]["url"].split(",", 1)[1])))
    assert len(reader) == 6 and reader.get_avg_fps() == 2.0 and reader[0].shape == (224, 224, 3)
    assert "video" in SCENARIOS
    assert all(r.kind != "video" for r in build_workload("mixed", 12, seed=1))      # only when asked for by name


def test_launched_server_that_exits_reports_its_command_and_log():
    from sgl_slim.bench.runner import LaunchedServer

    with pytest.raises(RuntimeError, match=r"--idpruner-keep-ratio 5.*exited with 2(.|\n)*idpruner-keep-ratio"):
        with LaunchedServer("--model demo --idpruner --idpruner-keep-ratio 5", port=35900):
            pass
