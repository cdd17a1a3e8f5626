"""The S2O calibration file format: round trip, and every way a file can be wrong (ValueError naming the field)."""

from __future__ import annotations

import json

import pytest

from sgl_slim.attention.calibration import FORMAT, S2OCalibration


def _cal(**kw) -> S2OCalibration:
    base = dict(model="tiny", num_layers=3, num_kv_heads=2, head_dim=16, error_budget=0.02, block_size=16,
                segment_size=32, variant="v2", taus=((1e-5, 2e-5), (0.0, 0.5), (3.0, 3.0)),
                densities=((0.5, 0.25), (1.0, 0.125), (0.0, 1.0)))
    base.update(kw)
    return S2OCalibration(**base)


def _json(**kw) -> dict:
    d = _cal().to_json()
    d.update(kw)
    return d


def test_round_trip_through_json_and_a_file(tmp_path):
    cal = _cal()
    assert S2OCalibration.from_json(json.loads(json.dumps(cal.to_json()))) == cal
    cal.save(tmp_path / "c.json")
    back = S2OCalibration.load(tmp_path / "c.json")
    assert back == cal and back.taus[0] == (1e-5, 2e-5) and back.densities[1] == (1.0, 0.125)
    assert json.loads((tmp_path / "c.json").read_text())["format"] == FORMAT


def test_densities_are_optional_and_lists_become_tuples():
    d = _json(taus=[[1, 2], [3, 4], [5, 6]])
    del d["densities"]
    cal = S2OCalibration.from_json(d)
    assert cal.densities is None and "densities" not in cal.to_json()
    assert cal.taus == ((1.0, 2.0), (3.0, 4.0), (5.0, 6.0)) and isinstance(cal.taus[0][0], float)
    assert hash(cal) == hash(S2OCalibration.from_json(d))


def test_layer_tau_gives_one_layers_heads():
    cal = _cal()
    assert cal.layer_tau(1) == (0.0, 0.5) and cal.layer_tau(2) == (3.0, 3.0)
    with pytest.raises(IndexError, match="layer 3 out of range"):
        cal.layer_tau(3)
    with pytest.raises(IndexError, match="layer -1"):
        cal.layer_tau(-1)


def test_check_model_names_every_difference():
    cal = _cal()
    cal.check_model(num_layers=3, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError) as exc:
        cal.check_model(num_layers=4, num_kv_heads=2, head_dim=128)
    msg = str(exc.value)
    assert "num_layers 3 in the file, 4 in the model" in msg and "head_dim 16 in the file, 128 in the model" in msg
    assert "num_kv_heads" not in msg and "'tiny'" in msg


@pytest.mark.parametrize("change, field", [
    (dict(format="sgl_slim.s2o_calibration/2"), "format"),
    (dict(format=None), "format"),
    (dict(model=7), "model"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_layers=2.0), "num_layers"),
    (dict(num_layers=True), "num_layers"),
    (dict(num_kv_heads=-1), "num_kv_heads"),
    (dict(head_dim="16"), "head_dim"),
    (dict(error_budget=-0.1), "error_budget"),
    (dict(error_budget=float("nan")), "error_budget"),
    (dict(error_budget="small"), "error_budget"),
    (dict(block_size=0), "block_size"),
    (dict(segment_size=40), "segment_size"),
    (dict(variant=""), "variant"),
    (dict(variant=2), "variant"),
    (dict(taus=[[0.1, 0.1], [0.1, 0.1]]), "taus"),                     # 2 layers, not 3
    (dict(taus=[[0.1, 0.1], [0.1], [0.1, 0.1]]), r"taus\[1\]"),        # 1 head, not 2
    (dict(taus=[[0.1, 0.1], [0.1, -1e-9], [0.1, 0.1]]), r"taus\[1\]\[1\]"),
    (dict(taus=[[0.1, 0.1], [0.1, 0.1], [0.1, float("inf")]]), r"taus\[2\]\[1\]"),
    (dict(taus=[[0.1, 0.1], [0.1, 0.1], [None, 0.1]]), r"taus\[2\]\[0\]"),
    (dict(taus=[[0.1, 0.1], 0.1, [0.1, 0.1]]), r"taus\[1\]"),
    (dict(taus="0.1"), "taus"),
    (dict(densities=[[0.5, 0.5], [0.5, 1.5], [0.5, 0.5]]), r"densities\[1\]\[1\]"),
    (dict(densities=[[0.5, 0.5]]), "densities"),
    (dict(extra=1), "extra"),
])
def test_every_invalid_field_is_named(change, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        S2OCalibration.from_json(_json(**change))


@pytest.mark.parametrize("name", ["model", "num_layers", "taus", "variant"])
def test_a_missing_field_is_named(name):
    d = _json()
    del d[name]
    with pytest.raises(ValueError, match=rf"^{name}: missing"):
        S2OCalibration.from_json(d)


def test_construction_validates_too():
    with pytest.raises(ValueError, match=r"^taus\[0\]\[0\]"):
        _cal(taus=((-1.0, 0.0), (0.0, 0.0), (0.0, 0.0)))


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a readable JSON file"):
        S2OCalibration.load(bad)
    with pytest.raises(ValueError, match="missing.json: not a readable JSON file"):
        S2OCalibration.load(tmp_path / "missing.json")
    bad.write_text(json.dumps(_json(num_kv_heads=3)))
    with pytest.raises(ValueError, match=r"bad.json: taus\[0\]: has 2 heads, num_kv_heads is 3"):
        S2OCalibration.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        S2OCalibration.load(bad)
