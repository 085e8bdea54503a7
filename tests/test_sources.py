"""Reward sources: baseline wrapper, memoisation, and the named Ray actor matching in-process scores."""

from __future__ import annotations

import functools
import tempfile

import numpy as np
import pytest

from rlsim.data import make_split
from rlsim.errors import ConfigError
from rlsim.sources import (BaselineRewardSource, CachedScorer, RemoteRewardSource, RewardSource, TableRewardSource,
                           get_or_create_reward_actor)


def test_baseline_source_matches_baseline(ml100k):
    split = make_split(ml100k, "u1")
    src = BaselineRewardSource.fit("bias", split.train, ml100k.scale)
    assert isinstance(src, RewardSource) and src.scale == ml100k.scale
    u, i = split.test.user_id.to_numpy()[:50], split.test.item_id.to_numpy()[:50]
    np.testing.assert_allclose(src.score(u, i), src.baseline.predict(u, i))
    with pytest.raises(ConfigError):
        BaselineRewardSource.fit("nope", split.train, ml100k.scale)


def test_cached_scorer_memoises_and_keeps_nan():
    src = TableRewardSource({(1, 1): 4.0, (1, 2): 2.0})
    calls = []
    orig = src.score
    src.score = lambda u, i: (calls.append(len(u)), orig(u, i))[1]
    c = CachedScorer(src)
    np.testing.assert_array_equal(c.score([1, 1, 2], [1, 2, 2]), [4.0, 2.0, np.nan])
    np.testing.assert_array_equal(c.score([1, 1], [2, 2]), [2.0, 2.0])
    assert calls == [3]
    s = c.stats()
    assert s["pairs_requested"] == 5 and s["pairs_computed"] == 3 and s["hit_rate"] == pytest.approx(0.4)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rlsim-t-", dir="/tmp"),
             log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def test_actor_matches_in_process(ray_local, ml100k):
    split = make_split(ml100k, "u1")
    factory = functools.partial(BaselineRewardSource.fit, "mf", split.train, ml100k.scale, 0)
    local = factory()
    actor = get_or_create_reward_actor("test-reward", factory)
    remote = RemoteRewardSource("test-reward")
    u, i = split.test.user_id.to_numpy(), split.test.item_id.to_numpy()
    np.testing.assert_allclose(remote.score(u, i), local.score(u, i))
    np.testing.assert_allclose(remote.score(u[:10], i[:10]), local.score(u[:10], i[:10]))
    st = remote.stats()
    assert st["calls"] == 2 and st["pairs_computed"] == len(set(zip(u, i)))
    assert remote.scale == ml100k.scale
    # The same name gives the same actor, and the client survives pickling (env runners).
    assert get_or_create_reward_actor("test-reward", factory)._actor_id == actor._actor_id
    import pickle

    again = pickle.loads(pickle.dumps(remote))
    np.testing.assert_allclose(again.score(u[:5], i[:5]), local.score(u[:5], i[:5]))
    with pytest.raises(ConfigError):
        RemoteRewardSource("no-such-actor").score(u[:1], i[:1])


@pytest.mark.slow
def test_model_source_in_actor_matches_predictor(ray_local, data_root, cache_root, tmp_path):
    """ModelRewardSource wraps the reward model; the named actor returns the same scores."""
    from rlsim.config import DataConfig
    from rlsim.reward.config import RewardConfig
    from rlsim.reward.predict import RewardPredictor
    from rlsim.reward.train import train_reward_model
    from rlsim.sources import ModelRewardSource

    dcfg = DataConfig(dataset="ml-100k", data_dir=str(data_root), cache_dir=str(cache_root), download=False)
    train_reward_model(dcfg, RewardConfig(dim=16, heads=2, ff_dim=32, text_hidden=32, layers=1, epochs=1,
                                          batch_size=256), tmp_path)
    pred = RewardPredictor.load(tmp_path / "checkpoint")
    src = ModelRewardSource.load(str(tmp_path / "checkpoint"))
    u, i = np.array([1, 2, 3, 3]), np.array([5, 6, 7, 70])
    np.testing.assert_allclose(src.score(u, i), pred.predict(u, i), rtol=1e-5)
    assert src.scale == pred.scale
    handle = get_or_create_reward_actor("test-model-reward", functools.partial(  # noqa: F841 - keeps it alive
        ModelRewardSource.load, str(tmp_path / "checkpoint")))
    np.testing.assert_allclose(RemoteRewardSource("test-model-reward").score(u, i), pred.predict(u, i), rtol=1e-5)


def test_actor_construction_error_is_one_line_user_error(ray_local, tmp_path):
    from rlsim.errors import RlsimError
    from rlsim.sources import ModelRewardSource

    with pytest.raises(RlsimError) as exc:
        get_or_create_reward_actor("bad-reward", functools.partial(ModelRewardSource.load, str(tmp_path / "none")))
    assert "\n" not in str(exc.value) and "checkpoint" in str(exc.value)
