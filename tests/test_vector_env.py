"""SessionVectorEnv: one batched simulator request per step, sessions, sampling, autoreset."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from rlsim.candidates import CandidatesConfig, build_candidates
from rlsim.data import make_split
from rlsim.env import build_env_data
from rlsim.errors import ConfigError
from rlsim.simulators.point import baseline_simulator
from rlsim.vector_env import SessionVectorEnv


K = 8  # candidates per user in these tests


class Recording:
    """Wraps a simulator; records every request (the env must send one per step)."""

    def __init__(self, inner):
        self.inner, self.scale, self.requests = inner, inner.scale, []

    def distribution(self, users, items, sessions=None):
        self.requests.append((np.asarray(users).copy(), np.asarray(items).copy(), list(sessions)))
        return self.inner.distribution(users, items, sessions)

    def score(self, users, items, sessions=None):
        self.scored = getattr(self, "scored", 0) + 1
        return self.inner.score(users, items, sessions)


@pytest.fixture(scope="module")
def parts(ml100k):
    split = make_split(ml100k, "u1")
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(ml100k.items), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cands = build_candidates(split.train, ml100k.items, emb, CandidatesConfig(k=K))
    data = build_env_data(split.train, ml100k.items, cands, emb, ml100k.scale, dims=8)
    return data, baseline_simulator("mf", split.train, ml100k.scale)


def make(parts, **kw):
    data, sim = parts
    rec = Recording(sim)
    cfg = {"data": data, "source": rec, "num_envs": 6, "horizon": 3, "reward_mode": "sampled", **kw}
    return SessionVectorEnv(cfg), rec


def first_valid(obs):
    return obs[:, -K:].argmax(1)  # the action mask ends the flat observation (rlsim.env.ObsLayout)


def test_one_request_per_step_with_growing_sessions(parts):
    env, rec = make(parts)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (6, env.obs_dim) and obs.dtype == np.float32 and env.single_observation_space.contains(obs[0])
    for t in range(3):
        obs, r, term, trunc, info = env.step(first_valid(obs))
        assert len(rec.requests) == t + 1  # all six envs in one request
        users, items, sessions = rec.requests[-1]
        assert len(users) == 6 and all(len(s) == t for s in sessions)
    assert term.all() and not trunc.any()
    # Each session carried the items shown and the ratings drawn before.
    _, items, sessions = rec.requests[-1]
    assert all(len(set(s.items)) == 2 for s in sessions)


def test_next_step_autoreset(parts):
    env, rec = make(parts, horizon=1)
    obs, _ = env.reset(seed=1)
    obs, r, term, _, _ = env.step(first_valid(obs))
    assert term.all()
    n = len(rec.requests)
    obs, r, term, _, info = env.step(first_valid(obs))
    # The step after termination resets: no simulator request, zero reward, not terminated.
    assert len(rec.requests) == n and (r == 0).all() and not term.any() and not info["_rating"].any()
    assert (env.layout.mask(obs).sum(1) > 0).all()


def test_sampled_rewards_are_seeded_and_follow_the_distribution(parts):
    def run(seed):
        env, _ = make(parts, horizon=1, center=False)
        obs, _ = env.reset(seed=seed)
        out = []
        for _ in range(40):
            obs, r, term, _, info = env.step(first_valid(obs))
            out.append(info["rating"][info["_rating"]])
        return np.concatenate(out)
    a, b, c = run(3), run(3), run(4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(np.unique(a)) <= {1.0, 2.0, 3.0, 4.0, 5.0} and len(np.unique(a)) >= 4


def test_expected_and_static_modes(parts):
    data, sim = parts
    env, rec = make(parts, horizon=1, reward_mode="expected", center=False)
    obs, _ = env.reset(seed=0)
    a = first_valid(obs)
    users = data.user_ids[env._u].copy()
    items = data.cand_items[env._u, a]
    _, _, _, _, info = env.step(a)
    assert np.allclose(info["rating"], sim.score(users, items))
    static, rec2 = make(parts, horizon=1, reward_mode="static", center=False)
    assert len(rec2.requests) == 0 and rec2.scored == 1  # scored once at start, never per step
    obs, _ = static.reset(seed=0)
    _, _, _, _, info = static.step(first_valid(obs))
    assert len(rec2.requests) == 0 and rec2.scored == 1


def test_users_leave_when_satisfaction_falls(parts):
    env, _ = make(parts, horizon=5, exit_threshold=6.0, exit_window=2)  # nobody is ever that happy
    obs, _ = env.reset(seed=0)
    obs, _, term, _, _ = env.step(first_valid(obs))
    assert not term.any()
    obs, _, term, _, _ = env.step(first_valid(obs))
    assert term.all()  # left after two ratings, before the horizon of 5


def test_bad_config(parts):
    data, sim = parts
    with pytest.raises(ConfigError):
        SessionVectorEnv({"data": data, "source": sim, "reward_mode": "bogus"})
    with pytest.raises(ConfigError):
        SessionVectorEnv({"data": data, "reward_mode": "sampled"})


def test_gymnasium_vector_entry_point(parts):
    data, sim = parts
    gym.register("rlsim-test-session-v0", entry_point=lambda: None,
                 vector_entry_point=lambda num_envs: SessionVectorEnv({"data": data, "source": sim, "num_envs": num_envs,
                                                                      "horizon": 2}))
    env = gym.make_vec("rlsim-test-session-v0", num_envs=4, vectorization_mode="vector_entry_point")
    obs, _ = env.reset(seed=0)
    assert env.num_envs == 4 and obs.shape == (4, *env.single_observation_space.shape)
    assert env.observation_space.contains(obs)


class Failing(Recording):
    """Fails every other pair of each request, with the simulator's reason (as the LLM persona does)."""

    def distribution_with_reasons(self, users, items, sessions=None):
        p = np.array(self.distribution(users, items, sessions), np.float64)
        why = ["" if j % 2 else "budget" for j in range(len(p))]
        p[[j for j, w in enumerate(why) if w]] = np.nan
        return p, why


def test_failed_rewards_are_counted_by_the_simulators_reason(parts):
    data, sim = parts
    env = SessionVectorEnv({"data": data, "source": Failing(sim), "num_envs": 6, "horizon": 2})
    obs, _ = env.reset(seed=0)
    for _ in range(2):
        obs, r, *_ = env.step(first_valid(obs))
    acc = env.reward_accounting()
    assert acc == {"asked": 12, "answered": 6, "failed": 6, "failed_by_reason": {"budget": 6},
                   "failed_share": 0.5}


def test_a_nan_without_a_reason_is_counted_as_unanswered(parts):
    data, sim = parts

    class Silent(Recording):
        def distribution(self, users, items, sessions=None):
            p = np.array(self.inner.distribution(users, items, sessions), np.float64)
            p[0] = np.nan
            return p

    env = SessionVectorEnv({"data": data, "source": Silent(sim), "num_envs": 4, "horizon": 1})
    obs, _ = env.reset(seed=0)
    env.step(first_valid(obs))
    acc = env.reward_accounting()
    assert acc["answered"] == 3 and acc["failed"] == 1 and acc["failed_by_reason"] == {"unanswered": 1}


class Choosing(Recording):
    """A recording simulator whose user picks a movie with probability p(item) (one request per step)."""

    def __init__(self, inner, p):
        super().__init__(inner)
        self.p, self.choices = p, []
        self.has_choice, self.name = True, "choosy"

    def choice(self, users, items, sessions=None):
        self.choices.append(np.asarray(items).copy())
        return np.array([self.p(int(i)) for i in items], float)


def make_choosing(parts, p, **kw):
    data, sim = parts
    rec = Choosing(sim, p)
    cfg = {"data": data, "source": rec, "num_envs": 6, "horizon": 3, "reward_mode": "sampled", **kw}
    return SessionVectorEnv(cfg), rec


def test_engagement_skips_earn_the_penalty_and_ask_no_rating(parts):
    env, rec = make_choosing(parts, lambda i: 0.0, reward="engagement", skip_penalty=0.25)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, r, term, trunc, info = env.step(first_valid(obs))
        assert (r == -0.25).all() and not info["watched"].any() and np.isnan(info["rating"]).all()
    assert len(rec.choices) == 3 and rec.requests == []  # one choice request per step; nothing to rate
    acc = env.reward_accounting()
    assert acc["shown"] == 18 and acc["skipped"] == 18 and acc["watch_rate"] == 0.0 and acc["asked"] == 0
    assert all(len(s) == 0 for s in env._sessions)  # a skip is not a rating of the session


def test_engagement_watches_earn_their_centred_rating_and_liked_is_binary(parts):
    data, _ = parts
    even = lambda i: 1.0 if i % 2 == 0 else 0.0  # noqa: E731
    env, rec = make_choosing(parts, even, reward="engagement")
    obs, _ = env.reset(seed=1)
    for _ in range(3):
        users = env._u.copy()
        obs, r, term, trunc, info = env.step(first_valid(obs))
        w = info["watched"]
        assert (w == (info["item_id"] % 2 == 0)).all()
        np.testing.assert_allclose(r[w], info["rating"][w] - data.user_mean[users[w]])
        assert (r[~w] == 0.0).all()
    assert sum(len(x) for x, *_ in rec.requests) == env.reward_accounting()["answered"]  # only watches rated
    env, _ = make_choosing(parts, even, reward="liked", like_threshold=4.0)
    obs, _ = env.reset(seed=2)
    for _ in range(3):
        obs, r, term, trunc, info = env.step(first_valid(obs))
        assert set(np.unique(r)) <= {0.0, 1.0}
        assert (r == (info["watched"] & (np.nan_to_num(info["rating"]) >= 4.0))).all()


def test_users_leave_after_skips_in_a_row(parts):
    env, _ = make_choosing(parts, lambda i: 0.0, reward="engagement", exit_after_skips=2)
    obs, _ = env.reset(seed=0)
    obs, _, term, _, _ = env.step(first_valid(obs))
    assert not term.any()
    _, _, term, _, _ = env.step(first_valid(obs))
    assert term.all()  # two skips: every user left before the horizon of 3


def test_a_failed_choice_is_a_failed_step_counted_by_its_reason(parts):
    """A choice the simulator could not answer (NaN: an LLM persona out of budget) is neither a skip nor a
    watch: a neutral reward, counted as failed with the simulator's reason, nothing rated for it."""

    class Broke(Choosing):
        def choice_with_reasons(self, users, items, sessions=None):
            p = self.choice(users, items, sessions)
            p[: len(p) // 2] = np.nan  # the first half of each step's users: no answer
            return p, ["budget" if np.isnan(x) else "" for x in p]

    data, sim = parts
    rec = Broke(sim, lambda i: 1.0)
    env = SessionVectorEnv({"data": data, "source": rec, "num_envs": 6, "horizon": 2, "reward_mode": "sampled",
                            "reward": "engagement", "skip_penalty": 0.5})
    obs, _ = env.reset(seed=0)
    obs, r, _, _, info = env.step(first_valid(obs))
    assert (r[:3] == 0.0).all() and not info["watched"][:3].any() and np.isnan(info["rating"][:3]).all()
    assert info["watched"][3:].all() and sum(len(x) for x, *_ in rec.requests) == 3  # only the answered rated
    assert all(len(env._sessions[j]) == 0 for j in range(3)) and (env._skips[:3] == 0).all()
    acc = env.reward_accounting()
    assert acc["failed"] == 3 and acc["failed_by_reason"] == {"budget": 3} and acc["answered"] == 3
    # shown, but neither skipped nor watched: skipped + answered + failed == shown still holds
    assert acc["shown"] == 6 and acc["skipped"] == 0 and acc["choice_failed"] == 3 and acc["watch_rate"] == 1.0


def test_engagement_needs_a_user_who_chooses(parts):
    with pytest.raises(ConfigError, match=r"only rates \(these choose: bias, mf, reward_model \(trained with"):
        make(parts, reward="engagement")
    with pytest.raises(ConfigError, match=r"these choose: .*llm_persona\)$"):  # the LLM persona chooses its page
        make(parts, reward="engagement")
    with pytest.raises(ConfigError, match="needs reward_mode sampled"):
        make_choosing(parts, lambda i: 1.0, reward="liked", reward_mode="expected")


@pytest.mark.parametrize("kw", [dict(horizon=4, history=2), dict(horizon=1, reward_mode="static", users_per_episode=3),
                                dict(horizon=3, history=0, reward_mode="expected")])
def test_flat_observation_carries_the_dict_observations_numbers(parts, kw):
    """The flat observation is exactly what the Dict observation held: {"observations": user, candidates,
    history; "action_mask": mask}, in that order, the same float32 numbers (rlsim.env.ObsLayout)."""
    import torch

    from rlsim.policy.rl_module import MASKED_LOGIT, SlateScorer

    data, sim = parts
    env = SessionVectorEnv({"data": data, "source": sim, "num_envs": 5, **kw})
    lay = env.layout
    obs, _ = env.reset(seed=2)
    torch.manual_seed(0)
    net = SlateScorer(data.user_dim, data.cand_dim, data.k, env.history, hidden=16)
    rng = np.random.default_rng(0)
    for _ in range(7):
        # The Dict observation as SessionVectorEnv built it before it went flat.
        old = np.concatenate([data.user_feat[env._u], data.cand_feat[env._u].reshape(5, -1),
                              env._hist.reshape(5, -1)], 1).astype(np.float32)
        mask = env._mask.copy()
        assert obs.dtype == np.float32 and obs.shape == (5, lay.size) == (5, old.shape[1] + data.k)
        assert lay.feats(obs).tobytes() == old.tobytes() and lay.mask(obs).tobytes() == mask.tobytes()
        np.testing.assert_array_equal(lay.user(obs), data.user_feat[env._u])
        np.testing.assert_array_equal(lay.cands(obs), data.cand_feat[env._u])
        np.testing.assert_array_equal(lay.hist(obs), env._hist.reshape(5, -1))
        # The network reads the same numbers: the Dict-era maths on (observations, action_mask).
        o, m = torch.from_numpy(old), torch.from_numpy(mask)
        with torch.no_grad():
            user, cands = o[:, :data.user_dim], o[:, data.user_dim:data.user_dim + data.k * data.cand_dim]
            ctx = torch.cat([user, o[:, data.user_dim + data.k * data.cand_dim:]], 1) if env.history else user
            c = net.ctx(ctx)
            z = torch.tanh(net.cand_mix(net.cand(cands.reshape(-1, data.k, data.cand_dim))) + net.ctx_mix(c).unsqueeze(1))
            want = torch.where(m > 0, net.out(z).squeeze(-1), torch.full((5, data.k), MASKED_LOGIT))
            w = m.unsqueeze(-1)
            want_emb = torch.cat([c, (z * w).sum(1) / w.sum(1).clamp(min=1.0)], -1)
            logits, emb = net(torch.from_numpy(obs))
            acting, none = net(torch.from_numpy(obs), values=False)
        assert torch.equal(logits, want) and torch.equal(emb, want_emb) and torch.equal(acting, want) and none is None
        picks = np.array([rng.choice(np.flatnonzero(r)) for r in mask])
        obs, *_ = env.step(picks)
