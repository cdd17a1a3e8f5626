import json

import pytest
import torch

from sgl_slim.attention.calibration import S2OCalibration
from sgl_slim.calibrate import LADDER, calibrate, choose


def test_choose_takes_the_qualifying_prefix_per_head_and_a_global_tau():
    taus = (0.0, 1e-3, 1e-2, 1e-1)
    # layer 0: head 0 fails at 1e-2 then passes again at 1e-1 (non-monotone: the prefix rule stops at 1e-3);
    # head 1 passes everywhere.  layer 1: head 0 passes up to 1e-2, head 1 only at 0.
    err = {0: [[0.0, 0.0], [0.005, 0.001], [0.02, 0.002], [0.005, 0.003]],
           1: [[0.0, 0.0], [0.004, 0.02], [0.009, 0.03], [0.05, 0.05]]}
    dens = {0: [[1.0, 1.0], [0.6, 0.5], [0.4, 0.3], [0.2, 0.1]],
            1: [[1.0, 1.0], [0.7, 0.6], [0.5, 0.4], [0.3, 0.2]]}
    t, d, g_tau, g_dens = choose([err], [dens], taus=taus, budget=0.01)
    assert t == [[1e-3, 1e-1], [1e-2, 0.0]]
    assert d == [[0.6, 0.1], [0.5, 1.0]]
    assert g_tau == 0.0 and g_dens == 1.0
    # a second prompt that fails layer 0 head 1 at 1e-1 lowers that head's choice
    err2 = {0: [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.5]], 1: err[1]}
    t2, _, _, _ = choose([err, err2], [dens, dens], taus=taus, budget=0.01)
    assert t2[0][1] == 1e-2


def test_calibration_file_is_valid_and_checked_against_the_model(tiny_model, tokenizer, stream, tmp_path):
    from sgl_slim.config import ConfigError, S2OConfig
    from sgl_slim.testbed.dump import long_prompt
    prompts = [long_prompt(tokenizer, 256, seed=100, stream=stream)]
    cal, summary = calibrate(tiny_model, prompts, model_name="tiny", error_budget=0.05, block_size=32,
                             segment_size=64, taus=(0.0, 1e-3, 1e-1, 0.5))
    cfg = tiny_model.config
    path = tmp_path / "cal.json"
    cal.save(path)
    loaded = S2OCalibration.load(path)
    assert loaded == cal
    assert (loaded.num_layers, loaded.num_kv_heads, loaded.head_dim) == (cfg.num_hidden_layers,
                                                                         cfg.num_key_value_heads, cfg.head_dim)
    loaded.check_model(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim)
    with pytest.raises(ValueError, match="num_layers 2 in the file, 3 in the model"):
        loaded.check_model(num_layers=3, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim)
    # every chosen tau is on the ladder, meets the budget on the prompt, and its density is recorded
    for layer in range(cfg.num_hidden_layers):
        for h, tau in enumerate(cal.layer_tau(layer)):
            i = (0.0, 1e-3, 1e-1, 0.5).index(tau)
            assert summary["errors"][str(layer)][i][h] <= 0.05
            assert 0 < cal.densities[layer][h] <= 1
    assert summary["global_density"] >= summary["mean_density"] - 1e-9
    # the launcher's flag accepts it with the matching block / segment size and names itself otherwise
    S2OConfig(enabled=True, block_size=32, segment_size=64, calibration=str(path)).validate()
    with pytest.raises(ConfigError) as exc:
        S2OConfig(enabled=True, block_size=128, segment_size=2048, calibration=str(path)).validate()
    assert exc.value.flag == "--s2o-calibration"
    assert json.loads(path.read_text())["format"] == "sgl_slim.s2o_calibration/1"


def test_ladder_starts_dense():
    assert LADDER[0] == 0.0 and list(LADDER) == sorted(LADDER)


def test_cli_refuses_a_budget_outside_0_1():
    from sgl_slim.calibrate import main
    with pytest.raises(SystemExit, match="--error-budget must be in"):
        main(["--model", "unused", "--error-budget", "1.5"])
