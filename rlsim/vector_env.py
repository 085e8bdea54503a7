"""Sessions against a live simulator: N users' episodes stepped together, one simulator call per step.

``SessionVectorEnv`` is a gymnasium VectorEnv (autoreset NEXT_STEP, as RLlib's env runners expect
with ``gym_env_vectorize_mode="vector_entry_point"``). Each sub-env is one user's session: the
policy picks one of the user's K candidates per step, and the reward is drawn from the simulator
given the session so far (rlsim.simulators.base: ``distribution(users, items, sessions)``). All N
envs' picks go to the simulator in ONE batched request per step, whether it lives in this process
or in a Ray actor shared by every env runner (rlsim.simulators.actor).

The observation of each session is one float32 vector (user, candidates, history, action mask), laid
out by rlsim.env.ObsLayout (``env.layout``), not a Dict.

reward_mode:
- "sampled": the rating is drawn from the simulator's distribution (seeded per env runner);
- "expected": the distribution's expectation (deterministic, still session-conditioned);
- "static": a table of each candidate's expected rating with no session, scored once at start
  (the fast path for horizon-1 deterministic training; it never sees the session, so it must be
  chosen explicitly).

reward (what the policy is paid for):
- "rating": the rating of every pick, as if the user watched whatever was shown (centred on the
  user's training mean when ``center``);
- "engagement": the user first chooses (a draw from the simulator's ``choice``): a skip earns
  ``-skip_penalty``, a watch its (centred) rating;
- "liked": 1 when the user watches it and rates it at least ``like_threshold``, else 0.
engagement and liked need a simulator that chooses (``has_choice``) and sampled rewards. A skipped
movie is masked like any shown one but does not join the session's ratings; the observation's
history carries each shown movie with the reward it earned. A choice the simulator could not answer
(NaN, e.g. an LLM persona out of budget) is a failed step: counted in ``failed_by_reason`` by its
reason, a neutral reward, neither watched nor skipped.

A user may leave early (as Agent4Rec's users do): with ``exit_threshold`` set, the session ends
when the mean of the last ``exit_window`` ratings falls below it; with ``exit_after_skips``, after
that many skips in a row.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from rlsim.env import EnvData, ObsLayout, make_source, score_all
from rlsim.errors import ConfigError
from rlsim.simulators.base import EMPTY, answered_rows, expectation, sample_from, unanswered_reasons

REWARD_MODES = ("sampled", "expected", "static")
REWARDS = ("rating", "engagement", "liked")


def distribution_of(sim, users, items, sessions) -> tuple[np.ndarray, list[str]]:
    """[n, C] probabilities from a simulator and each row's failure reason ("" when answered): the
    simulator's own (budget, http_500, ...) when it reports them, else "unanswered" for a NaN row."""
    if hasattr(sim, "distribution_with_reasons"):
        p, why = sim.distribution_with_reasons(users, items, sessions)
        p = np.asarray(p, np.float64)
        return p, unanswered_reasons(p, why)
    if hasattr(sim, "distribution"):
        p = np.asarray(sim.distribution(users, items, sessions), np.float64)
        return p, unanswered_reasons(p)
    raise ConfigError(f"{type(sim).__name__} has no distribution(); reward_mode 'sampled'/'expected' needs a "
                      "simulator (rlsim.simulators)")


class SessionVectorEnv(gym.vector.VectorEnv):
    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, config: dict | None = None):
        cfg = dict(config or {})
        data = cfg.get("data")
        if data is None and cfg.get("data_path"):
            data = EnvData.load(cfg["data_path"])
        if data is None:
            raise ConfigError("SessionVectorEnv needs env_config 'data' (EnvData) or 'data_path'")
        self.data: EnvData = data
        self.num_envs = int(cfg.get("num_envs", 1))
        self.horizon = int(cfg.get("horizon", 1))
        self.history = int(cfg.get("history", min(self.horizon - 1, 4)))
        self.center = bool(cfg.get("center", True))
        self.mode = cfg.get("reward_mode", "sampled")
        if self.mode not in REWARD_MODES:
            raise ConfigError(f"reward_mode must be one of {REWARD_MODES}, got {self.mode!r}")
        self.users_per_episode = int(cfg.get("users_per_episode", 1))
        if self.horizon < 1 or (self.users_per_episode > 1 and self.horizon != 1):
            raise ConfigError("horizon must be >= 1, and users_per_episode > 1 needs horizon 1")
        self.exit_threshold = cfg.get("exit_threshold")
        self.exit_window = int(cfg.get("exit_window", 3))
        self.reward = cfg.get("reward", "rating")
        if self.reward not in REWARDS:
            raise ConfigError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        self.skip_penalty = float(cfg.get("skip_penalty", 0.0))
        self.like_threshold = float(cfg.get("like_threshold", 4.0))
        self.exit_after_skips = cfg.get("exit_after_skips")
        self.sim = make_source(cfg)
        if self.reward != "rating":
            if self.mode != "sampled":
                raise ConfigError(f"reward {self.reward} draws the user's choice: it needs reward_mode sampled")
            if not getattr(self.sim, "has_choice", False):
                from rlsim.simulators.registry import choosers_text

                raise ConfigError(f"reward {self.reward} needs a simulated user that chooses what to watch; "
                                  f"{getattr(self.sim, 'name', 'this one')!r} only rates (these choose: "
                                  f"{choosers_text()})")
        self.scale = data.scale
        if self.mode == "static":
            self.table = data.rewards if data.rewards is not None else score_all(data, self.sim)
        elif self.sim is None:
            raise ConfigError("SessionVectorEnv needs a simulator (env_config 'source' or 'simulator_actor')")
        # Users this env trains on (rows of data); the rest are held out for evaluation.
        rows = cfg.get("user_rows")
        self.user_rows = np.arange(len(data.user_ids)) if rows is None else np.asarray(rows, np.int64)
        if len(self.user_rows) == 0:
            raise ConfigError("SessionVectorEnv has no users to train on")

        K = data.k
        # One flat float32 vector per session (rlsim.env.ObsLayout: user, candidates, history, mask).
        self.layout = ObsLayout.of(data, self.history)
        self.obs_dim = self.layout.size
        self.single_observation_space = self.layout.space()
        self.single_action_space = gym.spaces.Discrete(K)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        N = self.num_envs
        self._u = np.zeros(N, np.int64)
        self._t = np.zeros(N, np.int64)
        self._chained = np.zeros(N, np.int64)
        self._mask = np.zeros((N, K), np.float32)
        self._hist = np.zeros((N, self.history, self.layout.hist_dim), np.float32)
        self._sessions = [EMPTY] * N
        self._skips = np.zeros(N, np.int64)  # skips in a row (exit_after_skips)
        self._needs_reset = np.zeros(N, bool)
        self.calls = 0  # simulator requests made (one per step at most)
        # Every reward asked of the simulator is answered or failed (by the simulator's reason, e.g.
        # budget): a failed one earns the user's mean (reward 0 when centred), so it must be visible.
        self.answered = 0
        self.failed = 0
        self.failed_by_reason: dict[str, int] = {}
        self.shown = 0  # picks shown to a user who chooses (reward engagement/liked)
        self.choice_failed = 0  # of those, the choices the simulator could not answer (also in failed)
        self.skipped = 0

    # ------------------------------------------------------------------ users and observations
    def _start_user(self, j: int, fixed: int | None = None) -> None:
        d = self.data
        for _ in range(1 if fixed is not None else 100):
            u = int(self.user_rows[self.np_random.integers(len(self.user_rows))]) if fixed is None else int(fixed)
            mask = d.cand_valid[u].copy()
            if self.mode == "static":
                mask &= ~np.isnan(self.table[u])
            if mask.any():
                break
        self._u[j], self._t[j] = u, 0
        self._mask[j] = mask
        self._hist[j] = 0.0
        self._sessions[j] = EMPTY
        self._skips[j] = 0

    def _start_users(self, envs: np.ndarray) -> None:
        """_start_user for each of ``envs`` (ascending), drawn at once: the same draws in the same order,
        unless a drawn user has no candidate to show, when the generator is rewound and they go one by one."""
        if len(envs) == 0:
            return
        d, rng = self.data, self.np_random
        state = rng.bit_generator.state
        u = self.user_rows[rng.integers(len(self.user_rows), size=len(envs))]
        mask = d.cand_valid[u]
        if self.mode == "static":
            mask &= ~np.isnan(self.table[u])
        if not mask.any(1).all():
            rng.bit_generator.state = state
            for j in envs:
                self._start_user(j)
            return
        self._u[envs], self._t[envs], self._skips[envs] = u, 0, 0
        self._mask[envs] = mask
        self._hist[envs] = 0.0
        for j in envs:
            self._sessions[j] = EMPTY

    def _obs(self) -> np.ndarray:
        # A new array every step (RLlib keeps views of each row), filled in place: one copy, not three.
        d = self.data
        return self.layout.build(d.user_feat[self._u], d.cand_feat[self._u], self._hist, self._mask)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """options={"user_rows": [N rows of data]} starts env j on that user (evaluation);
        otherwise each env draws a user from ``user_rows`` with its seeded generator."""
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
        fixed = (options or {}).get("user_rows")
        if fixed is not None and len(fixed) != self.num_envs:
            raise ConfigError(f"reset(options=user_rows) needs {self.num_envs} rows, got {len(fixed)}")
        if fixed is None:
            self._start_users(np.arange(self.num_envs))
        else:
            for j in range(self.num_envs):
                self._start_user(j, fixed[j])
        self._chained[:] = 0
        self._needs_reset[:] = False
        return self._obs(), {}

    # ------------------------------------------------------------------ stepping
    def _ratings(self, rows: np.ndarray, picks: np.ndarray) -> np.ndarray:
        """Ratings of the picked candidates for the envs in rows: one simulator request for all."""
        d = self.data
        items = d.cand_items[self._u[rows], picks]
        if self.mode == "static":
            r = self.table[self._u[rows], picks]
            lost = int(np.isnan(r).sum())  # masked out at reset; counted all the same
            if lost:
                self.failed_by_reason["unanswered"] = self.failed_by_reason.get("unanswered", 0) + lost
            return r
        users = d.user_ids[self._u[rows]]
        p, why = distribution_of(self.sim, users, items, [self._sessions[j] for j in rows])
        self.calls += 1
        out = np.full(len(rows), np.nan)
        ok = answered_rows(p)
        for w in (w for w, a in zip(why, ok) if not a):
            self.failed_by_reason[w] = self.failed_by_reason.get(w, 0) + 1
        if ok.any():
            if self.mode == "sampled":
                out[ok] = sample_from(p[ok], self.scale, self.np_random)
            else:
                out[ok] = expectation(p[ok] / p[ok].sum(1, keepdims=True), self.scale)
        return out

    def step(self, actions):
        d = self.data
        N, K = self.num_envs, d.k
        actions = np.asarray(actions, np.int64).reshape(N)
        rewards = np.zeros(N, np.float64)
        terminated = np.zeros(N, bool)
        truncated = np.zeros(N, bool)
        info_rating = np.full(N, np.nan)
        info_item = np.full(N, -1, np.int64)
        resetting = self._needs_reset.copy()
        stepping = np.flatnonzero(~resetting)
        a = actions[stepping]
        valid = (a >= 0) & (a < K)
        valid[valid] = self._mask[stepping[valid], a[valid]] > 0
        ratings = np.full(len(stepping), float(d.scale_min))  # an invalid pick earns the worst rating
        watched = np.ones(len(stepping), bool)
        rows = stepping[valid]
        unanswered = np.zeros(len(stepping), bool)  # the user's choice failed (budget, ...): a failed step
        if len(rows) and self.reward != "rating":
            watched[valid], unanswered[valid] = self._choose(rows, a[valid])
        rated = valid & watched
        rows = stepping[rated]
        if len(rows):
            got = self._ratings(rows, a[rated])
            failed = np.isnan(got)
            self.failed += int(failed.sum())
            self.answered += int((~failed).sum())
            # No answer (a failed persona call): a neutral reward, the user's own mean, never a guess.
            got[failed] = d.user_mean[self._u[rows[failed]]]
            ratings[rated] = got
        # Array ops over the stepping envs (a Python loop per env cost ~25% of a sampled step); users
        # restart below in env order, so the seeded draws come in the same order as ever.
        u = self._u[stepping]
        mean = d.user_mean[u]
        rew = self._rewards(ratings, mean, watched)
        if unanswered.any():
            # A failed choice earns a neutral reward (the user's mean: 0 when centred; 0 for liked), never a guess.
            rew[unanswered] = 0.0 if self.reward == "liked" or self.center else mean[unanswered]
        rewards[stepping] = rew
        info_rating[stepping] = np.where(watched, ratings, np.nan)
        vj, vk, vu = stepping[valid], a[valid], u[valid]
        info_item[vj] = d.cand_items[vu, vk]
        self._mask[vj, vk] = 0.0
        if self.history:
            self._hist[vj, 1:] = self._hist[vj, :-1]
            self._hist[vj, 0, :-1] = d.cand_feat[vu, vk]
            self._hist[vj, 0, -1] = rew[valid] if self.reward != "rating" else ratings[valid] - mean[valid]
        seen = valid & watched
        if self.horizon > 1:  # a one-step session ends here: its Session is never read again
            for j, item, r in zip(stepping[seen], d.cand_items[u[seen], a[seen]], ratings[seen]):
                self._sessions[j] = self._sessions[j].extend(item, r)
        self._skips[stepping[seen]] = 0
        self._skips[stepping[valid & ~watched & ~unanswered]] += 1
        self._t[stepping] += 1
        done = (self._t[stepping] >= self.horizon) | ~self._mask[stepping].any(1)
        if self.exit_after_skips is not None or self.exit_threshold is not None:
            done |= np.array([self._leaves(j) for j in stepping], bool)
        ended = stepping[done]
        self._chained[ended] += 1
        last = self._chained[ended] >= self.users_per_episode
        self._start_users(ended[~last])  # chained one-step users: same episode, next user
        terminated[ended[last]] = True
        self._needs_reset[ended[last]] = True
        back = np.flatnonzero(resetting)
        self._start_users(back)
        self._chained[back] = 0
        self._needs_reset[back] = False
        infos = {"rating": info_rating, "_rating": ~resetting, "item_id": info_item, "_item_id": ~resetting}
        if self.reward != "rating":
            chose = np.zeros(N, bool)
            chose[stepping] = watched & valid
            infos.update(watched=chose, _watched=~resetting)
        return self._obs(), rewards, terminated, truncated, infos

    def _choose(self, rows: np.ndarray, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(watched, failed) per env in rows: one choice request for all, a seeded draw each. A choice the
        simulator could not answer (NaN: budget, an endpoint error) is a failed step, counted by its
        reason: neither watched nor skipped."""
        d = self.data
        users, items = d.user_ids[self._u[rows]], d.cand_items[self._u[rows], picks]
        sessions = [self._sessions[j] for j in rows]
        if hasattr(self.sim, "choice_with_reasons"):
            p, why = self.sim.choice_with_reasons(users, items, sessions)
        else:
            p = self.sim.choice(users, items, sessions)
            why = ["unanswered"] * len(rows)
        p = np.asarray(p, float)
        self.calls += 1
        failed = ~np.isfinite(p)
        for w, f in zip(why, failed):
            if f:
                self.failed_by_reason[w or "unanswered"] = self.failed_by_reason.get(w or "unanswered", 0) + 1
        self.failed += int(failed.sum())
        self.choice_failed += int(failed.sum())
        chosen = (self.np_random.random(len(rows)) < np.nan_to_num(p, nan=0.0)) & ~failed
        self.shown += len(rows)
        self.skipped += int((~chosen & ~failed).sum())
        return chosen, failed

    def _rewards(self, ratings: np.ndarray, user_mean: np.ndarray, watched: np.ndarray) -> np.ndarray:
        if self.reward == "liked":
            return (watched & (ratings >= self.like_threshold)).astype(np.float64)
        paid = ratings - user_mean if self.center else ratings.astype(np.float64)
        return np.where(watched, paid, -self.skip_penalty)

    def reward_accounting(self) -> dict:
        """{asked, answered, failed, failed_by_reason} of the rewards this env asked for."""
        return reward_accounting([{"answered": self.answered, "failed": self.failed,
                                   "failed_by_reason": self.failed_by_reason, "shown": self.shown,
                                   "skipped": self.skipped, "choice_failed": self.choice_failed}])

    def _leaves(self, j: int) -> bool:
        if self.exit_after_skips is not None and self._skips[j] >= int(self.exit_after_skips):
            return True
        if self.exit_threshold is None:
            return False
        r = self._sessions[j].ratings[-self.exit_window:]
        return len(r) == self.exit_window and float(np.mean(r)) < float(self.exit_threshold)


def reward_accounting(parts: list[dict]) -> dict:
    """Rewards asked of the simulator by some envs ({answered, failed, failed_by_reason} each), summed,
    with the failed share."""
    answered = sum(int(e["answered"]) for e in parts)
    failed = sum(int(e["failed"]) for e in parts)
    by: dict[str, int] = {}
    for e in parts:
        for k, v in e["failed_by_reason"].items():
            by[k] = by.get(k, 0) + int(v)
    asked = answered + failed
    out = {"asked": asked, "answered": answered, "failed": failed, "failed_by_reason": dict(sorted(by.items())),
           "failed_share": failed / asked if asked else 0.0}
    shown = sum(int(e.get("shown", 0)) for e in parts)
    if shown:  # a user who chooses: of the picks shown and answered, how many were watched (the rest skipped)
        skipped = sum(int(e.get("skipped", 0)) for e in parts)
        cf = sum(int(e.get("choice_failed", 0)) for e in parts)  # shown, no choice: failed steps, not skips
        out.update(shown=shown, skipped=skipped, choice_failed=cf,
                   watch_rate=(shown - skipped - cf) / (shown - cf) if shown > cf else 0.0)
    return out
