"""The recommendation env: gymnasium checks, rewards from the source, masking and history."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rlsim.candidates import CandidatesConfig, build_candidates
from rlsim.data import make_split
from rlsim.env import EnvData, RecommendationEnv, build_env_data, score_all
from rlsim.errors import ConfigError
from rlsim.sources import BaselineRewardSource


class CountingSource:
    def __init__(self, inner):
        self.inner, self.scale, self.calls = inner, inner.scale, 0

    def score(self, u, i):
        self.calls += 1
        return self.inner.score(u, i)


@pytest.fixture(scope="module")
def env_parts(ml100k):
    split = make_split(ml100k, "u1")
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(ml100k.items), 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cands = build_candidates(split.train, ml100k.items, emb, CandidatesConfig(k=8))
    data = build_env_data(split.train, ml100k.items, cands, emb, ml100k.scale, dims=8)
    src = BaselineRewardSource.fit("mf", split.train, ml100k.scale)
    return data, src, cands, split


@pytest.mark.parametrize("horizon", [1, 3])
def test_check_env(env_parts, horizon):
    data, src, _, _ = env_parts
    check_env(RecommendationEnv({"data": data, "source": src, "horizon": horizon}), skip_render_check=True)


def test_env_data_shapes_and_roundtrip(env_parts, tmp_path):
    data, _, cands, _ = env_parts
    assert data.k == 8 and data.cand_items.shape == (len(data.user_ids), 8)
    assert np.isfinite(data.cand_feat).all() and np.isfinite(data.user_feat).all()
    first = cands[cands["rank"] == 0].set_index("user_id").item_id
    assert (data.cand_items[:, 0] == first.reindex(data.user_ids).to_numpy()).all()
    back = EnvData.load(data.save(tmp_path / "ed"))
    np.testing.assert_array_equal(back.cand_feat, data.cand_feat)
    assert back.scale_max == data.scale_max and back.rewards is None


def test_reward_is_source_rating_centred_and_prefetched_once(env_parts):
    data, src, _, _ = env_parts
    counting = CountingSource(src)
    env = RecommendationEnv({"data": data, "source": counting, "center": True})
    expected = score_all(data, src)
    for u in range(5):
        obs, info = env.reset(options={"user_index": u})
        assert info["user_id"] == data.user_ids[u]
        _, r, term, trunc, info = env.step(3)
        assert term and not trunc
        assert info["item_id"] == data.cand_items[u, 3]
        assert r == pytest.approx(expected[u, 3] - data.user_mean[u])
    assert counting.calls == 1  # all users scored in one call at the first reset


def test_per_user_fetch_without_prefetch(env_parts):
    data, src, _, _ = env_parts
    counting = CountingSource(src)
    env = RecommendationEnv({"data": data, "source": counting, "prefetch": False, "center": False})
    for _ in range(3):
        env.reset(options={"user_index": 2})
        _, r, *_ = env.step(0)
    assert counting.calls == 1 and r == pytest.approx(score_all(data, src)[2, 0])


def test_session_masks_shown_items_and_records_history(env_parts):
    data, src, _, _ = env_parts
    env = RecommendationEnv({"data": data, "source": src, "horizon": 3, "history": 2, "center": False})
    obs, _ = env.reset(options={"user_index": 0})
    base = data.user_dim + data.k * data.cand_dim
    assert obs["observations"].shape == (base + 2 * (data.cand_dim + 1),)
    assert not obs["observations"][base:].any()
    obs, r, term, _, _ = env.step(1)
    assert obs["action_mask"][1] == 0 and obs["action_mask"].sum() == data.k - 1 and not term
    np.testing.assert_allclose(obs["observations"][base:base + data.cand_dim], data.cand_feat[0, 1])
    assert obs["observations"][base + data.cand_dim] == pytest.approx(r - data.user_mean[0])
    obs, _, term, _, _ = env.step(4)
    # Most recent first: item 4's features now lead the history block, item 1's follow.
    np.testing.assert_allclose(obs["observations"][base:base + data.cand_dim], data.cand_feat[0, 4])
    np.testing.assert_allclose(obs["observations"][base + data.cand_dim + 1:base + 2 * data.cand_dim + 1],
                               data.cand_feat[0, 1])
    _, _, term, _, _ = env.step(4)  # a repeated pick is invalid: worst rating, still counts as a step
    assert term


def test_invalid_action_gets_worst_rating_and_chained_users(env_parts):
    data, src, _, _ = env_parts
    table = score_all(data, src)
    table[0, 2] = np.nan  # the source could not rate this pair: masked out
    env = RecommendationEnv({"data": data.with_rewards(table), "center": False, "users_per_episode": 4})
    obs, _ = env.reset(options={"user_index": 0})
    assert obs["action_mask"][2] == 0
    _, r, term, _, info = env.step(2)
    assert r == data.scale_min and not info["valid"] and not term
    steps = 1
    while not term:
        _, _, term, _, _ = env.step(0)
        steps += 1
    assert steps == 4
    with pytest.raises(ConfigError):
        RecommendationEnv({"data": data, "source": src, "horizon": 2, "users_per_episode": 2})
    with pytest.raises(ConfigError):
        RecommendationEnv({"data": data})
