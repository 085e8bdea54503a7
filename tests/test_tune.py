"""The reward-model sweep: ASHA trials on fixture data, restore of a finished experiment, best.yaml."""

from __future__ import annotations

import pytest

from rlsim.config import DataConfig, load_yaml
from rlsim.errors import ConfigError
from rlsim.tune import TuneConfig, build_param_space, run_sweep


def test_param_space_rejects_unknown_fields_and_samplers():
    with pytest.raises(ConfigError, match="not a reward config field"):
        build_param_space({"learning_rate": {"choice": [1]}}, {"lr"})
    with pytest.raises(ConfigError, match="expected one of"):
        build_param_space({"lr": {"normal": [0, 1]}}, {"lr"})
    space = build_param_space({"lr": {"loguniform": [1e-4, 1e-2]}, "dim": 32}, {"lr", "dim"})
    assert space["dim"] == 32 and 1e-4 <= space["lr"].sample() <= 1e-2


def test_tune_config_validation():
    with pytest.raises(ConfigError):
        TuneConfig(grace_period=5, max_epochs=2).validate()
    with pytest.raises(ConfigError):
        TuneConfig(mode="up").validate()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_sweep_restore_and_best_yaml(ray_local, data_root, cache_root, tmp_path):
    from rlsim.reward.config import RewardConfig

    data_cfg = DataConfig(dataset="ml-100k", data_dir=str(data_root), cache_dir=str(cache_root), download=False)
    base = RewardConfig(dim=16, layers=1, heads=2, ff_dim=32, text_hidden=32, batch_size=256)
    tcfg = TuneConfig(num_samples=3, max_concurrent=2, grace_period=1, max_epochs=3, name="t",
                      storage_path=f"file://{tmp_path / 'results'}",
                      search_space={"lr": {"loguniform": [1e-3, 1e-2]}, "dim": {"choice": [16, 32]},
                                    "heads": 2, "dropout": {"uniform": [0.0, 0.2]}})
    m = run_sweep(data_cfg, base, tcfg, out_dir=tmp_path / "out")
    assert m["n_trials"] == 3 and m["n_errors"] == 0
    assert 0 < m["best"]["val_rmse"] < 2.0 and 0 <= m["best"]["val_accuracy"] <= 1
    assert 1 <= m["best_epoch"] <= 3
    assert (tmp_path / "results" / "t").is_dir()
    # best.yaml is a config `rlsim reward train --config` reads: data + reward sections.
    best = load_yaml(tmp_path / "out" / "best.yaml")
    cfg = RewardConfig.from_dict(best["reward"])
    assert cfg.dim == m["best_config"]["dim"] and cfg.lr == pytest.approx(m["best_config"]["lr"])
    assert cfg.epochs == 3 and best["data"]["dataset"] == "ml-100k"
    # Restoring the finished experiment runs nothing new and finds the same winner.
    again = run_sweep(data_cfg, base, tcfg, out_dir=tmp_path / "out2", resume=True)
    assert again["n_trials"] == 3
    assert again["best"]["val_rmse"] == pytest.approx(m["best"]["val_rmse"])
    assert again["best_config"] == m["best_config"]
