"""A request's ``sgl_slim`` object is checked like the launch flags: every field, its type, its range, the
feature it needs, unknown fields; each error names the field (and the flag where that helps)."""

import math

import pytest

from sgl_slim.config import IDPrunerConfig, S2OConfig, SampConfig, SlimConfig
from sgl_slim.request_settings import (CARRIER_KEY, FIELDS, RequestSettings, RequestSettingsError, check_settings,
                                       parse_request_settings, settings_from_custom_params)

ALL_ON = SlimConfig(s2o=S2OConfig(enabled=True), idpruner=IDPrunerConfig(enabled=True),
                    samp=SampConfig(enabled=True))
TOGGLE = {"idpruner_keep_ratio": "--idpruner", "idpruner_video_keep_ratio": "--idpruner",
          "samp_keep_ratio": "--samp", "s2o_tau": "--s2o", "s2o": "--s2o"}
GOOD = {"idpruner_keep_ratio": 0.5, "idpruner_video_keep_ratio": 0.2,
        "samp_keep_ratio": 0.8, "s2o_tau": 3e-3, "s2o": True}


def test_no_object_and_empty_object_change_nothing():
    for value in (None, {}):
        settings = parse_request_settings(value, SlimConfig())
        assert settings == RequestSettings() and not settings and settings.to_dict() == {}
    assert RequestSettings().idpruner(ALL_ON.idpruner) is ALL_ON.idpruner
    assert RequestSettings().samp(ALL_ON.samp) is ALL_ON.samp
    assert RequestSettings().s2o_tau_for(1e-3) == 1e-3


def test_every_field_is_accepted_in_range_and_applied():
    assert set(GOOD) == set(FIELDS)
    settings = parse_request_settings(GOOD, ALL_ON)
    assert settings.to_dict() == GOOD
    assert settings.idpruner(ALL_ON.idpruner).keep_ratio == 0.5
    assert settings.idpruner(ALL_ON.idpruner).video_keep_ratio == 0.2
    assert settings.idpruner(ALL_ON.idpruner).mmr_lambda == ALL_ON.idpruner.mmr_lambda     # the rest: the server's
    assert settings.samp(ALL_ON.samp).keep_ratio == 0.8
    assert settings.s2o_tau_for(1e-3) == 3e-3
    assert parse_request_settings({"s2o": False}, ALL_ON).s2o_tau_for(1e-3) == 0.0           # dense
    # the ends of the flags' ranges
    assert parse_request_settings({"idpruner_keep_ratio": 1, "samp_keep_ratio": 1.0, "s2o_tau": 0}, ALL_ON) \
        .to_dict() == {"idpruner_keep_ratio": 1.0, "samp_keep_ratio": 1.0, "s2o_tau": 0.0}


@pytest.mark.parametrize("server_video,request_fields,want_image,want_video", [
    (None, {}, 0.25, 0.25),                                             # the server's image ratio for both
    (None, {"idpruner_keep_ratio": 0.5}, 0.5, 0.5),                     # the request's, for both
    (0.1, {"idpruner_keep_ratio": 0.5}, 0.5, 0.1),                      # the server set its video ratio
    (0.1, {"idpruner_video_keep_ratio": 0.3}, 0.25, 0.3),
    (None, {"idpruner_keep_ratio": 0.5, "idpruner_video_keep_ratio": 1}, 0.5, 1.0),
])
def test_video_ratio_follows_the_image_ratio_unless_set(server_video, request_fields, want_image, want_video):
    server = IDPrunerConfig(enabled=True, keep_ratio=0.25, video_keep_ratio=server_video)
    cfg = parse_request_settings(request_fields, SlimConfig(idpruner=server)).idpruner(server)
    assert (cfg.ratio(), cfg.ratio(video=True)) == (want_image, want_video)
    assert cfg.keep_count(144, video=True) == round(144 * want_video)


def test_integers_become_floats_so_equal_settings_hash_equal():
    settings = parse_request_settings({"idpruner_keep_ratio": 1}, ALL_ON)
    assert type(settings.idpruner_keep_ratio) is float
    assert repr(settings.idpruner(ALL_ON.idpruner).keep_ratio) == repr(1.0)


@pytest.mark.parametrize("name,value,flag", [
    ("idpruner_keep_ratio", 0, "--idpruner-keep-ratio"), ("idpruner_keep_ratio", 1.5, "--idpruner-keep-ratio"),
    ("idpruner_keep_ratio", -0.1, "--idpruner-keep-ratio"), ("samp_keep_ratio", 0.0, "--samp-keep-ratio"),
    ("samp_keep_ratio", 2, "--samp-keep-ratio"), ("s2o_tau", -1e-3, "--s2o-tau"),
    ("idpruner_video_keep_ratio", 0, "--idpruner-video-keep-ratio"),
    ("idpruner_video_keep_ratio", 1.01, "--idpruner-video-keep-ratio"),
])
def test_out_of_range_names_the_field_and_the_flag(name, value, flag):
    with pytest.raises(RequestSettingsError) as err:
        parse_request_settings({name: value}, ALL_ON)
    assert f"sgl_slim.{name}" in str(err.value) and flag in str(err.value) and "range" in str(err.value)
    assert isinstance(err.value, ValueError)                 # SGLang answers ValueError with HTTP 400


@pytest.mark.parametrize("name", ["idpruner_keep_ratio", "idpruner_video_keep_ratio", "samp_keep_ratio", "s2o_tau"])
@pytest.mark.parametrize("value", ["0.5", None, True, [0.5], {"v": 0.5}, math.nan, math.inf, -math.inf, 10 ** 400])
def test_numbers_of_the_wrong_type_or_not_finite_are_refused(name, value):
    with pytest.raises(RequestSettingsError, match=f"sgl_slim.{name}: must be a (finite )?number"):
        parse_request_settings({name: value}, ALL_ON)


@pytest.mark.parametrize("value", [0, 1, "false", None, 0.0, [], {}])
def test_s2o_must_be_a_bool(value):
    with pytest.raises(RequestSettingsError, match="sgl_slim.s2o: must be true or false"):
        parse_request_settings({"s2o": value}, ALL_ON)


@pytest.mark.parametrize("name", list(FIELDS))
def test_a_field_of_a_feature_that_is_off_names_the_flag(name):
    with pytest.raises(RequestSettingsError) as err:
        parse_request_settings({name: GOOD[name]}, SlimConfig())
    message = str(err.value)
    assert f"sgl_slim.{name}" in message and f"started without {TOGGLE[name]}" in message
    assert f"start it with {TOGGLE[name]}" in message
    # on when only its own feature is on
    section = FIELDS[name].section
    cfg = SlimConfig(**{section: type(getattr(SlimConfig(), section))(enabled=True)})
    assert parse_request_settings({name: GOOD[name]}, cfg).to_dict() == {name: GOOD[name]}


def test_unknown_fields_are_named():
    with pytest.raises(RequestSettingsError, match=r"unknown fields 'keep_ratio', 'tau'; known: idpruner_keep"):
        parse_request_settings({"keep_ratio": 0.5, "idpruner_keep_ratio": 0.5, "tau": 1}, ALL_ON)
    with pytest.raises(RequestSettingsError, match=r"unknown field 'x' *;"):
        parse_request_settings({"x": 1}, SlimConfig())       # before the feature checks: the name is the news


@pytest.mark.parametrize("value", ["idpruner_keep_ratio=0.5", 0.5, [{"idpruner_keep_ratio": 0.5}], True])
def test_the_object_must_be_an_object(value):
    with pytest.raises(RequestSettingsError, match="sgl_slim must be a JSON object"):
        parse_request_settings(value, ALL_ON)


def test_contradictions_and_calibration():
    with pytest.raises(RequestSettingsError, match="s2o_tau: has no effect with sgl_slim.s2o false"):
        parse_request_settings({"s2o": False, "s2o_tau": 0.1}, ALL_ON)
    calibrated = SlimConfig(s2o=S2OConfig(enabled=True, calibration="cal.json"))     # not read by these checks
    with pytest.raises(RequestSettingsError, match="s2o_tau: .*--s2o-calibration"):
        parse_request_settings({"s2o_tau": 0.1}, calibrated)
    assert parse_request_settings({"s2o": False}, calibrated).s2o is False


def test_carried_settings_read_back_and_garbage_counts_as_none():
    settings = parse_request_settings(GOOD, ALL_ON)
    assert settings_from_custom_params({CARRIER_KEY: settings.to_dict(), "other": 1}) == settings
    for custom in (None, {}, {"other": 1}, {CARRIER_KEY: "x"}, {CARRIER_KEY: {"idpruner_keep_ratio": 7}}, [1]):
        assert settings_from_custom_params(custom) == RequestSettings()


def test_check_settings_needs_no_server():
    assert check_settings({"samp_keep_ratio": 0.3}).samp_keep_ratio == 0.3
