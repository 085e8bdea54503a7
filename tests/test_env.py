"""Env data tables, and the session env's masking, history, invalid picks and chained users."""

from __future__ import annotations

import numpy as np
import pytest

from rlsim.candidates import CandidatesConfig, build_candidates
from rlsim.data import make_split
from rlsim.env import EnvData, build_env_data, score_all
from rlsim.errors import ConfigError
from rlsim.simulators.point import baseline_simulator
from rlsim.vector_env import SessionVectorEnv


@pytest.fixture(scope="module")
def env_parts(ml100k):
    split = make_split(ml100k, "u1")
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(ml100k.items), 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cands = build_candidates(split.train, ml100k.items, emb, CandidatesConfig(k=8))
    data = build_env_data(split.train, ml100k.items, cands, emb, ml100k.scale, dims=8)
    return data, baseline_simulator("mf", split.train, ml100k.scale), cands, split


def test_env_data_shapes_roundtrip_and_subset(env_parts, tmp_path):
    data, _, cands, _ = env_parts
    assert data.k == 8 and data.cand_items.shape == (len(data.user_ids), 8)
    assert np.isfinite(data.cand_feat).all() and np.isfinite(data.user_feat).all()
    first = cands[cands["rank"] == 0].set_index("user_id").item_id
    assert (data.cand_items[:, 0] == first.reindex(data.user_ids).to_numpy()).all()
    back = EnvData.load(data.save(tmp_path / "ed"))
    np.testing.assert_array_equal(back.cand_feat, data.cand_feat)
    assert back.scale_max == data.scale_max and back.rewards is None
    sub = data.subset(np.array([2, 0]))
    assert sub.user_ids.tolist() == [data.user_ids[2], data.user_ids[0]]
    np.testing.assert_array_equal(sub.cand_feat[1], data.cand_feat[0])
    assert sub.scale_min == data.scale_min and sub.k == data.k


def test_static_reward_is_the_simulator_expectation_centred(env_parts):
    data, sim, _, _ = env_parts
    expected = score_all(data, sim)
    env = SessionVectorEnv({"data": data, "source": sim, "reward_mode": "static", "num_envs": 5})
    obs, _ = env.reset(seed=0, options={"user_rows": np.arange(5)})
    _, r, term, trunc, info = env.step(np.full(5, 3))
    assert term.all() and not trunc.any()
    np.testing.assert_array_equal(info["item_id"], data.cand_items[:5, 3])
    np.testing.assert_allclose(r, expected[:5, 3] - data.user_mean[:5])


def test_session_masks_shown_items_and_records_history(env_parts):
    data, sim, _, _ = env_parts
    env = SessionVectorEnv({"data": data, "source": sim, "horizon": 3, "history": 2, "center": False,
                            "reward_mode": "expected", "num_envs": 1})
    obs, _ = env.reset(seed=0, options={"user_rows": [0]})
    lay = env.layout
    base = data.user_dim + data.k * data.cand_dim
    assert lay.features == base + 2 * (data.cand_dim + 1) and obs.shape == (1, lay.features + data.k)
    assert not lay.hist(obs).any()
    obs, r, term, _, _ = env.step([1])
    assert lay.mask(obs)[0, 1] == 0 and lay.mask(obs)[0].sum() == data.k - 1 and not term[0]
    np.testing.assert_allclose(obs[0, base:base + data.cand_dim], data.cand_feat[0, 1])
    assert obs[0, base + data.cand_dim] == pytest.approx(r[0] - data.user_mean[0])
    obs, _, term, _, _ = env.step([4])
    # Most recent first: item 4's features now lead the history block, item 1's follow.
    np.testing.assert_allclose(obs[0, base:base + data.cand_dim], data.cand_feat[0, 4])
    np.testing.assert_allclose(obs[0, base + data.cand_dim + 1:base + 2 * data.cand_dim + 1],
                               data.cand_feat[0, 1])
    _, r, term, _, info = env.step([4])  # a repeated pick is invalid: worst rating, still a step
    assert term[0] and info["rating"][0] == data.scale_min


def test_unrated_pairs_masked_invalid_pick_worst_and_chained_users(env_parts):
    data, sim, _, _ = env_parts
    table = score_all(data, sim)
    table[0, 2] = np.nan  # the simulator could not rate this pair: masked out
    env = SessionVectorEnv({"data": data.with_rewards(table), "center": False, "users_per_episode": 4,
                            "reward_mode": "static", "num_envs": 1})
    obs, _ = env.reset(seed=0, options={"user_rows": [0]})
    assert env.layout.mask(obs)[0, 2] == 0
    _, r, term, _, info = env.step([2])
    assert r[0] == data.scale_min and info["item_id"][0] == -1 and not term[0]
    steps = 1
    while not term[0]:
        _, _, term, _, _ = env.step([0])
        steps += 1
    assert steps == 4
    with pytest.raises(ConfigError):
        SessionVectorEnv({"data": data, "source": sim, "horizon": 2, "users_per_episode": 2})
    with pytest.raises(ConfigError):
        SessionVectorEnv({"data": data, "reward_mode": "sampled"})
    with pytest.raises(ConfigError):
        env.reset(options={"user_rows": [0, 1]})


def test_training_users_only(env_parts):
    data, sim, _, _ = env_parts
    env = SessionVectorEnv({"data": data, "source": sim, "reward_mode": "static", "num_envs": 16,
                            "user_rows": [3, 5]})
    seen = set()
    obs, _ = env.reset(seed=0)
    for _ in range(10):
        seen |= set(env._u.tolist())
        obs, *_ = env.step(env.layout.mask(obs).argmax(1))
    assert seen == {3, 5}
