"""The simulator contract (rlsim.simulators): distributions, sampling, noise, sessions, fidelity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rlsim.data.schema import RatingScale
from rlsim.simulators.base import Session, Simulator, sample_from
from rlsim.simulators.fidelity import discrimination, macro, micro, replay_sessions, session_gain
from rlsim.simulators.noise import OrdinalNoise, user_spread
from rlsim.simulators.point import baseline_simulator

SCALE = RatingScale(1.0, 5.0, 1.0)


def test_session_is_checked_and_extends():
    s = Session().extend(3, 4.0).extend(7, 2.0)
    assert s.items == (3, 7) and s.ratings == (4.0, 2.0) and len(s) == 2
    assert s.last(1) == Session((7,), (2.0,))
    with pytest.raises(ValueError):
        Session((1, 2), (3.0,))


def test_sample_from_matches_the_distribution():
    p = np.tile([[0.1, 0.2, 0.3, 0.0, 0.4]], (20000, 1))
    draws = sample_from(p, SCALE, np.random.default_rng(0))
    freq = np.bincount(SCALE.to_class(draws), minlength=5) / len(draws)
    assert np.abs(freq - p[0]).max() < 0.015
    assert freq[3] == 0.0  # a zero-probability rating is never drawn
    again = sample_from(p, SCALE, np.random.default_rng(0))
    assert np.array_equal(draws, again)  # seeded


class Fixed(Simulator):
    """Puts all mass on a given rating per pair (a perfect or a constant simulator)."""

    name, method = "fixed", "test"

    def __init__(self, ratings):
        self.scale = SCALE
        self.ratings = ratings

    def distribution(self, users, items, sessions=None):
        r = np.asarray([self.ratings(u, i) for u, i in zip(users, items)], float)
        p = np.zeros((len(r), 5))
        p[np.arange(len(r)), SCALE.to_class(r)] = 1.0
        return p


def _frames(seed=0, n_users=40, n_items=60):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        for i in rng.choice(np.arange(1, n_items + 1), 25, replace=False):
            rows.append((u, int(i), float(1 + (u * 3 + i) % 5), int(rng.integers(0, 10**6))))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    test = df.groupby("user_id").tail(5)
    return df.drop(test.index), test


def test_micro_and_macro_of_a_perfect_simulator():
    train, test = _frames()
    truth = dict(zip(zip(test.user_id, test.item_id), test.rating))
    sim = Fixed(lambda u, i: truth[(u, i)])
    m = micro(sim, test)
    assert m["rmse"] == 0.0 and m["exact"] == 1.0 and m["nll"] < 1e-4
    assert macro(sim, test)["tv_sampled"] == 0.0


def test_discrimination_is_chance_for_a_constant_simulator_and_one_for_an_oracle():
    train, test = _frames()
    const = discrimination(Fixed(lambda u, i: 3.0), train, test, ratios=(1, 3), like_threshold=4.0)
    assert abs(const["1to1"]["accuracy"] - 0.5) < 0.15 and abs(const["1to3"]["accuracy"] - 0.25) < 0.12
    liked = set(zip(test.user_id[test.rating >= 4], test.item_id[test.rating >= 4]))
    oracle = discrimination(Fixed(lambda u, i: 5.0 if (u, i) in liked else 1.0), train, test, ratios=(1, 3, 9))
    assert all(v["accuracy"] == 1.0 for v in oracle.values())


def test_ordinal_noise_recovers_a_known_spread():
    rng = np.random.default_rng(1)
    n = 20000
    users = rng.integers(1, 201, n)
    mu = rng.normal(3.5, 0.6, n)
    wide = users > 100  # half the users spread their ratings twice as much
    latent = mu + rng.normal(0, 1.0, n) * np.where(wide, 1.4, 0.7)
    y = SCALE.round(np.clip(latent, 1, 5))
    spread = pd.Series(np.where(np.arange(1, 201) > 100, 1.4, 0.7), index=np.arange(1, 201))
    noise = OrdinalNoise.fit(mu, y, users, spread, SCALE)
    p = noise.distribution(mu, users)
    assert np.allclose(p.sum(1), 1.0)
    # Sampled ratings reproduce the real histogram, and the wide users get wider answers.
    sampled = sample_from(p, SCALE, np.random.default_rng(2))
    real_h, sim_h = np.bincount(SCALE.to_class(y), minlength=5) / n, np.bincount(SCALE.to_class(sampled), minlength=5) / n
    assert 0.5 * np.abs(real_h - sim_h).sum() < 0.02
    assert sampled[wide].std() > sampled[~wide].std() + 0.2


def test_point_simulator_session_moves_the_expectation():
    train, test = _frames()
    sim = baseline_simulator("bias", train, SCALE)
    u, i = test.user_id.to_numpy()[:6], test.item_id.to_numpy()[:6]
    base = sim.score(u, i)
    hi = sim.score(u, i, [Session((1, 2, 3), (5.0, 5.0, 5.0))] * 6)
    lo = sim.score(u, i, [Session((1, 2, 3), (1.0, 1.0, 1.0))] * 6)
    assert np.all(hi > base) and np.all(lo < base)
    p = sim.distribution(u, i)
    assert np.allclose(p.sum(1), 1.0) and np.allclose(sim.score(u, i), p @ SCALE.values)
    assert np.allclose(sim.score(u, i, [Session()] * 6), base)  # an empty session changes nothing


def test_session_gain_replays_in_time_order():
    train, test = _frames()
    df, sessions = replay_sessions(test)
    for _, g in df.groupby("user_id"):
        assert g["timestamp"].is_monotonic_increasing
    assert [len(s) for s in sessions[:5]] == [0, 1, 2, 3, 4]
    g = session_gain(baseline_simulator("mf", train, SCALE), test)
    assert g["pairs"] == int(sum(len(s) > 0 for s in sessions)) and np.isfinite(g["session_nll_gain"])


def test_reward_model_session_equals_training_on_the_session():
    """A session's ratings enter the history tokens exactly as if they had been training ratings."""
    from rlsim.reward.config import RewardConfig
    from rlsim.reward.features import build_features
    from rlsim.reward.model import VanillaTransformer

    rng = np.random.default_rng(0)
    train, _ = _frames()
    items = pd.DataFrame({"item_id": np.arange(1, 61)})
    users = pd.DataFrame({"user_id": np.arange(1, 41), "age": 30, "gender": "M", "occupation": "other"})
    text = {"genre": rng.normal(size=(60, 8)).astype(np.float32), "plot": rng.normal(size=(60, 8)).astype(np.float32)}
    cfg = RewardConfig(dim=16, heads=2, ff_dim=32, text_hidden=16, layers=1, dropout=0.0)
    u = 7
    unseen = np.setdiff1d(np.arange(1, 61), train[train.user_id == u].item_id)
    s_items, target = unseen[:2], unseen[2]
    m = train["rating"].mean()
    s_ratings = (5.0, 2 * m - 5.0)  # symmetric around the global mean: centring is unchanged
    ft = build_features(items, users, train, text)
    extra = pd.DataFrame({"user_id": u, "item_id": s_items, "rating": s_ratings, "timestamp": 0})
    ft2 = build_features(items, users, pd.concat([train, extra], ignore_index=True), text)
    torch.manual_seed(0)
    m1 = VanillaTransformer(cfg, ft, SCALE.values).eval()
    m2 = VanillaTransformer(cfg, ft2, SCALE.values).eval()
    m2.load_state_dict({k: v for k, v in m1.state_dict().items() if k not in m1.DERIVED_BUFFERS}, strict=False)
    from rlsim.reward.predict import RewardPredictor

    p1 = RewardPredictor([m1], ft, SCALE, cfg).predict_proba([u], [target], [Session(tuple(s_items), s_ratings)])
    p2 = RewardPredictor([m2], ft2, SCALE, cfg).predict_proba([u], [target])
    p0 = RewardPredictor([m1], ft, SCALE, cfg).predict_proba([u], [target])
    assert np.allclose(p1, p2, atol=1e-5)
    assert not np.allclose(p1, p0, atol=1e-4)


def test_point_simulator_spread_matches_held_out_error():
    """The noise is fitted on ratings the predictor did not see, so its spread is the real error
    (MF nearly interpolates its training ratings: a spread fitted there would be far too narrow)."""
    train, test = _frames()
    sim = baseline_simulator("mf", train, SCALE)
    u, i = test.user_id.to_numpy(), test.item_id.to_numpy()
    p = sim.distribution(u, i)
    mean = p @ SCALE.values
    sd = np.sqrt(np.maximum(p @ SCALE.values ** 2 - mean ** 2, 0))
    err = np.sqrt(np.mean((mean - test.rating.to_numpy()) ** 2))
    assert 0.7 < np.sqrt(np.mean(sd ** 2)) / err < 1.3
    assert len(user_spread(train)) == train.user_id.nunique()
