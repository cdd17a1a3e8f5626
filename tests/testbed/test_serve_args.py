import pytest

from benchmarks.testbed_serve import server_args, server_specs


def _flag(args, name):
    return args[args.index(name) + 1]


def test_cpu_servers_run_float32_and_only_the_s2o_ones_carry_s2o_flags():
    specs = server_specs([], tau0=False)
    assert list(specs) == ["dense", "s2o"]
    dense = server_args("M", 8192, specs["dense"], 1024, gpu=False, servers=2)
    s2o = server_args("M", 8192, specs["s2o"], 1024, gpu=False, servers=2)
    assert _flag(dense, "--dtype") == "float32" and "--s2o" not in dense and "--attention-backend" not in dense
    assert s2o[s2o.index("--s2o"):] == ["--s2o", "--s2o-min-length", "1024"]
    assert _flag(s2o, "--context-length") == "16384" and _flag(s2o, "--max-total-tokens") == "24576"
    assert "--enable-metrics" in dense and "--enable-metrics" in s2o     # the request phases in meta_info


def test_one_s2o_server_per_flag_set_beside_one_dense():
    specs = server_specs(["", "--s2o-variant v5", "--s2o-variant v5 --s2o-audit-last 2048"], tau0=True)
    assert specs == {"dense": [], "s2o": ["--s2o"], "s2o --s2o-variant v5": ["--s2o", "--s2o-variant", "v5"],
                     "s2o --s2o-variant v5 --s2o-audit-last 2048": ["--s2o", "--s2o-variant", "v5",
                                                                     "--s2o-audit-last", "2048"],
                     "s2o_tau0": ["--s2o", "--s2o-tau", "0"]}
    more = server_specs([""], tau0=False, dense_flags=["--chunked-prefill-size 32768"])
    assert list(more) == ["dense", "dense --chunked-prefill-size 32768", "s2o"]
    args = server_args("M", 8192, more["dense --chunked-prefill-size 32768"], 1024, gpu=True, servers=3)
    assert _flag(args, "--chunked-prefill-size") == "32768" and "--s2o-min-length" not in args


def test_gpu_servers_share_the_gpu_on_triton_attention_and_tau0_means_tau_0():
    args = server_args("M", 32768, server_specs([], tau0=True)["s2o_tau0"], 1024, gpu=True, servers=3)
    assert _flag(args, "--dtype") == "bfloat16" and _flag(args, "--attention-backend") == "triton"
    assert 3 * float(_flag(args, "--mem-fraction-static")) <= 0.8
    assert _flag(args, "--s2o-tau") == "0" and "--s2o" in args


def _write_run(path, length, latencies, lost):
    import json
    with open(path, "w") as f:
        f.write(json.dumps({"env": {}}) + "\n")
        for server, latency in latencies.items():
            f.write(json.dumps({"bench": "testbed_serve", "server": server, "length": length, "samples": 10,
                                "latency_s": latency, "lost_vs_dense": lost.get(server, 0),
                                "gained_vs_dense": 0}) + "\n")


def test_report_gives_each_server_its_runs_speedup_and_plots(tmp_path):
    from benchmarks.testbed_serve_report import main, summaries
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_run(a, 32768, {"dense": 0.2, "s2o": 0.1}, {})
    _write_run(b, 131072, {"dense": 1.8, "s2o": 0.6}, {"s2o": 1})
    rows = {(r["length"], r["server"]): r["speedup"] for r in summaries([str(a), str(b)])}
    assert rows == pytest.approx({(32768, "dense"): 1.0, (32768, "s2o"): 2.0, (131072, "dense"): 1.0,
                                  (131072, "s2o"): 3.0})
    main([str(a), str(b), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="twice at length 32768"):
        main([str(a), str(a), "--out", str(tmp_path / "q.png")])


def test_summary_pairs_each_server_with_dense_prompt_by_prompt():
    from benchmarks.testbed_serve import summarise

    def row(server, task, correct, out, density=None, latency=1.0):
        return {"server": server, "task": task, "correct": correct, "output_ids": out, "density": density,
                "latency_s": latency}
    rows = [row("dense", "kv", True, [1]), row("s2o", "kv", False, [2], 0.2, 0.5),       # lost
            row("s2o", "kv", True, [3], 0.4, 0.3), row("dense", "kv", False, [4]),       # gained (order: reversed)
            row("dense", "passkey", True, [5]), row("s2o", "passkey", True, [5], 0.3, 0.4),
            row("s2o", "passkey", False, [7], 0.3, 0.45), row("dense", "passkey", True, [6])]        # lost
    dense, s2o = summarise(rows, ["dense", "s2o"], ["passkey", "kv"], 4096)
    assert (s2o["lost_vs_dense"], s2o["gained_vs_dense"], s2o["equal_to_dense"]) == (2, 1, 1 / 4)
    assert s2o["kv_accuracy"] == 0.5 and s2o["passkey_accuracy"] == 0.5 and s2o["latency_s"] == pytest.approx(0.425)
    assert abs(s2o["s2o_density"] - 0.3) < 1e-12 and dense["s2o_density"] is None and dense["equal_to_dense"] == 1.0
