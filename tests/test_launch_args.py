"""Flag parsing and validation of `python -m sgl_slim.launch`: every invalid case exits 2 naming the flag,
before SGLang is imported or a model is loaded."""

import subprocess
import sys
from pathlib import Path

import pytest

from sgl_slim.config import ENV_VAR, SlimConfig
from sgl_slim.launch import RECIPE_DIR, parse_slim_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, flag", [
    (["--idpruner", "--idpruner-keep-ratio", "0"], "--idpruner-keep-ratio"),
    (["--idpruner-keep-ratio", "1.5"], "--idpruner-keep-ratio"),
    (["--samp-keep-ratio", "-0.1"], "--samp-keep-ratio"),
    (["--samp-keep-ratio", "1.0001"], "--samp-keep-ratio"),
    (["--s2o", "--s2o-tau", "-1e-3"], "--s2o-tau"),
    (["--s2o-block-size", "48"], "--s2o-block-size"),
    (["--s2o-segment-size", "100"], "--s2o-segment-size"),
    (["--s2o-min-length", "-1"], "--s2o-min-length"),
    (["--idpruner-lambda", "1.2"], "--idpruner-lambda"),
    (["--idpruner-min-tokens", "0"], "--idpruner-min-tokens"),
    (["--recipe", "no-such-recipe"], "--recipe"),
    (["--eagle-draft", "/nonexistent/draft"], "--eagle-draft"),
    (["--eagle-steps", "0"], "--eagle-steps"),
    (["--idpruner-keep-ratio", "abc"], "--idpruner-keep-ratio"),
    (["--s2o-variant", "v9"], "--s2o-variant"),
    (["--s2o", "--s2o-audit-last", "256"], "--s2o-audit-last"),          # the default variant, v4, audits all
    (["--s2o", "--s2o-variant", "v5", "--s2o-audit-last", "0"], "--s2o-audit-last"),
    (["--s2o", "--s2o-audit-form", "sideways"], "--s2o-audit-form"),
    (["--s2o", "--s2o-variant", "v3", "--s2o-audit-form", "split"], "--s2o-audit-form"),   # v3 does not audit
])
def test_invalid_values_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_slim_args(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_invalid_value_exits_before_sglang_is_imported():
    # A real process: status 2, the flag named on stderr, and no SGLang import (it takes ~20 s; this is fast).
    code = ("import sys, runpy; sys.argv=['x', '--samp-keep-ratio', '2'];\n"
            "try:\n    runpy.run_module('sgl_slim.launch', run_name='__main__')\n"
            "finally:\n    print('SGLANG_IMPORTED' if 'sglang' in sys.modules else 'NO_SGLANG')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "--samp-keep-ratio" in proc.stderr and "(0, 1]" in proc.stderr
    assert "NO_SGLANG" in proc.stdout


def test_unreadable_draft_dir(tmp_path):
    (tmp_path / "draft").mkdir()  # exists but has no config.json
    with pytest.raises(SystemExit):
        parse_slim_args(["--eagle-draft", str(tmp_path / "draft")])


def test_defaults_and_values_reach_the_config():
    cfg, argv, _ = parse_slim_args(["--idpruner", "--idpruner-keep-ratio", "0.5", "--s2o", "--s2o-tau=0.01",
                                    "--port", "1234", "--model", "demo-audio"])
    assert cfg.idpruner.enabled and cfg.idpruner.keep_ratio == 0.5 and cfg.idpruner.mmr_lambda == 0.5
    assert cfg.s2o.enabled and cfg.s2o.tau == 0.01
    assert not cfg.samp.enabled and not cfg.eagle.enabled
    # sgl_slim's flags are removed; SGLang's stay in order
    assert argv == ["--port", "1234", "--model", "demo-audio"]


def test_every_s2o_variant_of_the_attention_api_is_a_flag_value():
    from sgl_slim.attention import VARIANTS
    for variant in VARIANTS:
        cfg, _, _ = parse_slim_args(["--s2o", "--s2o-variant", variant])
        assert cfg.s2o.variant == variant


def test_default_model_is_the_demo():
    _, argv, _ = parse_slim_args(["--port", "1"])
    assert argv[:2] == ["--model-path", "demo"]


def test_config_round_trips_through_the_env():
    cfg, _, _ = parse_slim_args(["--samp", "--samp-keep-ratio", "0.4", "--samp-merge-threshold", "1.5"])
    env = {}
    cfg.to_env(env)
    assert ENV_VAR in env
    assert SlimConfig.from_env(env) == cfg
    assert SlimConfig.from_env({}) == SlimConfig()


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPE_DIR.glob("*.toml")))
def test_every_recipe_loads(recipe):
    cfg, argv, _ = parse_slim_args(["--recipe", recipe])
    assert isinstance(cfg, SlimConfig)
    assert "--model-path" in argv or "--model" in argv


def test_explicit_flags_override_the_recipe():
    cfg, argv, _ = parse_slim_args(["--recipe", "demo"])
    assert cfg.idpruner.enabled and cfg.idpruner.keep_ratio == 0.25
    cfg, argv, _ = parse_slim_args(["--recipe", "demo", "--idpruner-keep-ratio", "0.5", "--max-total-tokens", "99"])
    assert cfg.idpruner.keep_ratio == 0.5
    # the recipe's SGLang flags come first and the user's after them, so the user's value wins in argparse
    assert argv.index("--dtype") < argv.index("--max-total-tokens")
    assert argv[-2:] == ["--max-total-tokens", "99"]


def test_recipes_exist_for_the_models_users_serve():
    names = {p.stem for p in RECIPE_DIR.glob("*.toml")}
    assert {"demo", "demo-audio", "qwen2.5-vl-7b-instruct", "qwen2-audio-7b-instruct",
            "llama-3.1-8b-instruct-128k", "qwen3-8b"} <= names


@pytest.mark.parametrize("world, cpus, expected", [
    (2, [0, 1], "0|1"),                         # this 2-core machine, --tp-size 2
    (3, [0, 1], "0|1|0"),                       # more ranks than cores: shared round robin
    (2, list(range(8)), "0-3|4-7"),
    (3, list(range(8)), "0-2|3-5|6-7"),         # uneven split: the first groups get the extra core
    (2, [5, 0, 3, 2], "0,2|3,5"),               # sorted; non-contiguous groups listed
    (1, [0, 1], "0-1"),
])
def test_cpu_thread_binding(world, cpus, expected):
    from sgl_slim.launch import cpu_thread_binding

    assert cpu_thread_binding(world, cpus) == expected


def test_cpu_thread_binding_rejects_nonsense():
    from sgl_slim.launch import cpu_thread_binding

    with pytest.raises(ValueError, match="at least one rank"):
        cpu_thread_binding(0, [0, 1])


def test_audit_last_reaches_the_config():
    cfg, _, _ = parse_slim_args(["--s2o", "--s2o-variant", "v5", "--s2o-audit-last", "2048"])
    assert cfg.s2o.audit_last == 2048 and cfg.s2o.variant == "v5"
    assert parse_slim_args(["--s2o", "--s2o-variant", "v5"])[0].s2o.audit_last is None


def test_audit_form_reaches_the_config():
    assert parse_slim_args(["--s2o", "--s2o-audit-form", "split"])[0].s2o.audit_form == "split"
    assert parse_slim_args(["--s2o", "--s2o-variant", "v5", "--s2o-audit-form", "fused"])[0].s2o.audit_form == "fused"
    assert parse_slim_args(["--s2o"])[0].s2o.audit_form is None
