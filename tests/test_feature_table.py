"""The feature table (sgl_slim.config.FEATURES) is what the launcher, the configuration, the plugin, the symbol
check and the metrics read: each of them is checked against it here."""

import argparse
import importlib
from dataclasses import fields

import pytest

from sgl_slim.config import ALWAYS, ENV_VAR, FEATURES, WHEN_LAUNCHED, WHEN_ON, WITH_ANY_ON, SlimConfig, feature
from sgl_slim.launch import add_slim_arguments, parse_slim_args


def test_table_names_are_unique_and_known():
    names = [f.name for f in FEATURES]
    modules = [f.module for f in FEATURES]
    assert len(set(names)) == len(names), f"a feature is listed twice: {names}"
    assert len(set(modules)) == len(modules), f"a glue module is listed twice: {modules}"
    assert {f.install for f in FEATURES} <= {WHEN_ON, ALWAYS, WHEN_LAUNCHED, WITH_ANY_ON}
    assert feature("samp").module == "samp_hooks"
    with pytest.raises(KeyError, match="no sgl_slim feature 'nope'"):
        feature("nope")


def test_config_sections_are_the_table_features_with_settings():
    sections = [(f.name, f.default_factory) for f in fields(SlimConfig)]
    assert sections == [(f.name, f.config) for f in FEATURES if f.config is not None]
    assert [f.name for f in FEATURES if f.toggled] == ["s2o", "idpruner", "samp", "eagle"]
    assert SlimConfig().enabled_features() == []


def test_every_table_flag_is_a_launcher_flag_that_sets_its_setting():
    parser = argparse.ArgumentParser()
    add_slim_arguments(parser)
    by_flag = {opt: action for action in parser._actions for opt in action.option_strings}
    table_flags = [flag.name for f in FEATURES for flag in f.flags]
    assert set(by_flag) - {"-h", "--help", "--recipe"} == set(table_flags)
    for part in FEATURES:
        settings = {f.name: f.default for f in fields(part.config)} if part.config else {}
        for flag in part.flags:
            assert flag.setting in settings, f"{flag.name} sets {part.name}.{flag.setting}, which does not exist"
            action = by_flag[flag.name]
            if flag.kind is not bool:
                assert action.default == settings[flag.setting], flag.name
    # a value reaches the section and field the table names
    cfg, _, _ = parse_slim_args(["--samp-merge-threshold", "0.7", "--s2o-min-length", "5"])
    assert cfg.samp.merge_threshold == 0.7 and cfg.s2o.min_length == 5


def test_symbol_check_covers_every_glue_module_of_the_table():
    from sgl_slim.integration.symbols import all_symbols

    assert set(all_symbols()) == {"core"} | {f.module for f in FEATURES}


@pytest.fixture
def recorded_installs(monkeypatch):
    """Every table module's install() replaced by a recorder; the plugin's per-process state emptied."""
    from sgl_slim.integration import plugin

    calls = []
    for part in FEATURES:
        module = importlib.import_module(f"sgl_slim.integration.{part.module}")
        monkeypatch.setattr(module, "install", lambda cfg, name=part.module: calls.append(name))
    monkeypatch.setattr(plugin, "_state", {"installed": set(), "config": None, "announced": False})
    return plugin, calls


def test_plugin_installs_in_table_order_what_the_flags_ask(recorded_installs, monkeypatch):
    plugin, calls = recorded_installs
    cfg, _, _ = parse_slim_args(["--samp", "--idpruner"])
    monkeypatch.setenv(ENV_VAR, cfg.to_json())
    plugin.register()
    assert calls == ["input_checks", "containment", "standins.cpu_parallel", "standins.video_decoder",
                     "request_hooks", "s2o_backend", "idpruner_hooks", "samp_hooks", "metrics"]
    plugin.register()                                    # idempotent: nothing installed twice
    assert len(calls) == 9
    assert plugin.installed_features() == set(calls)


def test_plugin_under_plain_sglang_registers_only_the_always_part(recorded_installs, monkeypatch):
    plugin, calls = recorded_installs
    monkeypatch.delenv(ENV_VAR, raising=False)
    plugin.register()
    assert calls == ["s2o_backend"]


def test_metrics_report_exactly_the_table_fields():
    from types import SimpleNamespace

    from sgl_slim.integration import metrics

    declared = {name for f in FEATURES for name in f.metric_fields}
    assert {metrics.S2O_DENSITY, metrics.S2O_SPARSE, metrics.VISION_KEPT, metrics.VISION_TOTAL, metrics.AUDIO_KEPT,
            metrics.AUDIO_TOTAL, metrics.DRAFT_PROPOSED, metrics.DRAFT_ACCEPTED} == declared
    req = SimpleNamespace(rid="r", multimodal_inputs=None, spec_verify_ct=2, spec_num_correct_drafts=1)
    got = metrics.request_numbers(req, SlimConfig(), draft_tokens_per_verify=4)
    assert set(got) == set(feature("eagle").metric_fields)
