"""Reward-model training on Ray Train (reward.workers >= 1): shards, 1 vs 2 workers, the checkpoint,
the flag, and a Tune sweep whose trials are Ray Train runs. One private Ray for the module."""

from __future__ import annotations

import numpy as np
import pytest

from rlsim.config import DataConfig
from rlsim.errors import ConfigError, RlsimError
from rlsim.io import read_json
from rlsim.reward.config import RewardConfig

TINY = dict(dim=16, layers=1, heads=2, ff_dim=32, text_hidden=32, epochs=3, batch_size=128, decay_epochs=0, seed=0)
# On the fixture (u1: 1,274 training ratings, 319 test pairs) changing only the seed moves the test RMSE
# by up to 0.01 (seeds 0-4: 1.128-1.137); 1 and 2 workers must agree as closely as two seeds do.
# The 0.003 of the issue is for real ML-100K u1 (bench/reward_scaling.py --compare-u1).
TOLERANCE = 0.02


def test_shards_are_disjoint_and_cover_the_pairs():
    from rlsim.reward.distributed import shard_indices

    for n, workers in ((1001, 3), (8, 2), (5, 1)):
        shards = shard_indices(n, workers, seed=3)
        assert len(shards) == workers
        together = np.concatenate(shards)
        assert len(together) == n and set(together.tolist()) == set(range(n))  # disjoint and covering
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    a, b = shard_indices(1001, 2, seed=3), shard_indices(1001, 2, seed=4)
    np.testing.assert_array_equal(a[0], shard_indices(1001, 2, seed=3)[0])  # seeded
    assert not np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], np.arange(len(a[0])))  # a random split, not the first rows


def test_config_and_shard_checks():
    from rlsim.reward.distributed import check_shards

    with pytest.raises(ConfigError, match="workers"):
        RewardConfig(workers=-1).validate()
    with pytest.raises(ConfigError, match="must not exceed reward.batch_size"):
        RewardConfig(workers=8, batch_size=4).validate()
    check_shards(1000, RewardConfig(workers=2, batch_size=128))
    # 10 rows, batch 4: 3 batches per epoch, but 3 workers get 3 rows each -> fine; 4 workers get 2.
    check_shards(10, RewardConfig(workers=3, batch_size=4))
    with pytest.raises(ConfigError, match="fewer rows"):
        check_shards(10, RewardConfig(workers=4, batch_size=4))


def test_workers_need_a_running_ray(data_cfg):
    import ray

    from rlsim.reward.train import train_reward_model

    if ray.is_initialized():  # another module left its Ray running: the check cannot be seen here
        pytest.skip("a Ray is already running in this process")
    with pytest.raises(RlsimError, match="needs a running Ray"):
        train_reward_model(data_cfg, RewardConfig(**TINY, workers=1), None)


def test_workers_flag():
    from rlsim.cli import build_parser, run_config
    from rlsim.commands.reward import reward_config

    args = build_parser().parse_args(["reward", "train", "--workers", "2", "--num-cpus", "2", "--out", "o"])
    assert reward_config(run_config(args, {})).workers == 2
    args = build_parser().parse_args(["reward", "train", "--out", "o"])
    assert reward_config(run_config(args, {})).workers == 0


def test_max_batches_caps_an_epoch(data_cfg):
    """The quick-measurement cap: an epoch runs max_batches batches, in process as on workers."""
    from rlsim.reward.loop import steps_per_epoch
    from rlsim.reward.train import train_reward_model

    res = train_reward_model(data_cfg, RewardConfig(**{**TINY, "epochs": 2, "max_batches": 3}), None)
    full, run = steps_per_epoch(res["train_fit_pairs"], RewardConfig(**TINY, max_batches=3))
    assert full > 3 and run == 3
    for h in res["history"]:
        assert round(h["ratings_per_s"] * h["train_seconds"]) == 3 * TINY["batch_size"]


@pytest.fixture(scope="module")
def data_cfg(data_root, cache_root):
    return DataConfig(dataset="ml-100k", data_dir=str(data_root), cache_dir=str(cache_root), split="u1",
                      download=False)


@pytest.fixture(scope="module")
def ray_module():
    from tests.ray_local import private_ray

    with private_ray("rlrd", num_cpus=2) as ray:
        yield ray


@pytest.fixture(scope="module")
def runs(ray_module, data_cfg, tmp_path_factory):
    """The same config trained with 1 and with 2 Ray Train workers (the second writes a run folder)."""
    from rlsim.reward.train import train_reward_model

    out = tmp_path_factory.mktemp("reward-2w")
    reports: list[dict] = []
    one = train_reward_model(data_cfg, RewardConfig(**TINY, workers=1), None)
    two = train_reward_model(data_cfg, RewardConfig(**TINY, workers=2), out, report_fn=reports.append)
    return one, two, out, reports


def test_one_and_two_workers_agree(runs):
    one, two, _, reports = runs
    assert abs(one["model"]["rmse"] - two["model"]["rmse"]) < TOLERANCE
    assert abs(one["val_rmse"] - two["val_rmse"]) < TOLERANCE
    for res, workers in ((one, 1), (two, 2)):
        assert res["model"]["rmse"] < res["baselines"]["global_mean"]["rmse"]
        losses = [h["train_loss"] for h in res["history"]]
        assert losses[-1] < losses[0]
        assert {h["workers"] for h in res["history"]} == {workers}
        assert all(h["worker_peak_rss_mb"] > 0 and h["ratings_per_s"] > 0 for h in res["history"])
    assert len(reports) == len(two["history"]) and reports[0]["epoch"] == 1


def test_an_epoch_sees_every_training_pair_once(runs, data_cfg):
    """The workers' shares add up (all-reduced) to one pass over the training pairs."""
    from rlsim.data import holdout_validation, load_split

    one, two, _, _ = runs
    _, split = load_split(data_cfg)
    n_fit = len(holdout_validation(split.train, TINY.get("val_frac", 0.1), TINY["seed"])[0])
    for res in (one, two):
        for h in res["history"]:
            assert round(h["ratings_per_s"] * h["train_seconds"]) == n_fit


def test_checkpoint_loads_and_predicts(runs, data_cfg):
    from rlsim.data import load_split
    from rlsim.reward.evaluate import evaluate_predictor
    from rlsim.reward.predict import RewardPredictor

    _, two, out, _ = runs
    pred = RewardPredictor.load(out / "checkpoint")
    assert pred.cfg.workers == 2
    _, split = load_split(data_cfg)
    metrics, _ = evaluate_predictor(pred, split.train, split.test, baselines=False)
    assert metrics["model"]["rmse"] == pytest.approx(two["model"]["rmse"], abs=1e-6)
    saved = read_json(out / "metrics.json")
    assert saved["model"]["rmse"] == pytest.approx(two["model"]["rmse"])
    assert saved["best_epoch"] == [int(np.argmin([h["val_rmse"] for h in saved["history"]])) + 1]
    assert (out / "per_user.parquet").is_file()


def test_sweep_trials_are_ray_train_runs(ray_module, data_cfg, tmp_path):
    import pandas as pd

    from rlsim.tune import TuneConfig, run_sweep

    base = RewardConfig(**{**TINY, "workers": 1})
    tcfg = TuneConfig(num_samples=1, max_concurrent=1, grace_period=1, max_epochs=2, name="tw",
                      storage_path=str(tmp_path / "results"), search_space={"lr": {"choice": [3e-3]}})
    m = run_sweep(data_cfg, base, tcfg, out_dir=tmp_path / "out")
    assert m["n_trials"] == 1 and m["n_errors"] == 0
    assert 0 < m["best"]["val_rmse"] < 2.0
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    # Both epochs reached Tune from the Ray Train workers (the trial reported twice).
    assert int(trials["training_iteration"].max()) == 2
