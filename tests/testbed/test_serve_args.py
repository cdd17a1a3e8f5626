from benchmarks.testbed_serve import server_args


def _flag(args, name):
    return args[args.index(name) + 1]


def test_cpu_servers_run_float32_and_only_the_s2o_ones_carry_s2o_flags():
    dense = server_args("M", 8192, "dense", 1024, gpu=False, servers=2)
    s2o = server_args("M", 8192, "s2o", 1024, gpu=False, servers=2)
    assert _flag(dense, "--dtype") == "float32" and "--s2o" not in dense and "--attention-backend" not in dense
    assert s2o[s2o.index("--s2o"):] == ["--s2o", "--s2o-min-length", "1024"]
    assert _flag(s2o, "--context-length") == "16384" and _flag(s2o, "--max-total-tokens") == "24576"


def test_gpu_servers_share_the_gpu_on_triton_attention_and_tau0_means_tau_0():
    args = server_args("M", 32768, "s2o_tau0", 1024, gpu=True, servers=3)
    assert _flag(args, "--dtype") == "bfloat16" and _flag(args, "--attention-backend") == "triton"
    assert 3 * float(_flag(args, "--mem-fraction-static")) <= 0.8
    assert _flag(args, "--s2o-tau") == "0" and "--s2o" in args
