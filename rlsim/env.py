"""The recommendation environment: pick one of a user's K RankZero candidates, get the source's rating.

Feature tables are built once by ``build_env_data`` (a pure function of the training ratings,
candidates and item text embeddings) into an ``EnvData`` that is pickled into env_config or
saved to a folder; a step is an array lookup. Rewards for all of a user's candidates are fetched
in one call at reset (by default all users' in one call at the first reset) and cached, so an
actor-backed source costs one round-trip per env, not one per step.

Horizon 1 is the paper's one-shot recommendation. With horizon H > 1 an episode is a session:
shown items are masked and the last shown items' features and rewards join the observation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd

from rlsim.candidates import item_popularity, taste_vectors
from rlsim.errors import ConfigError, DataError


@dataclass
class EnvData:
    user_ids: np.ndarray  # [U]
    cand_items: np.ndarray  # [U, K] item ids (0 where padded)
    cand_valid: np.ndarray  # [U, K] bool
    user_feat: np.ndarray  # [U, Du] float32
    cand_feat: np.ndarray  # [U, K, Dc] float32
    pop_score: np.ndarray  # [U, K] popularity score of each candidate (the popularity-first baseline)
    user_mean: np.ndarray  # [U] training mean rating
    scale_min: float
    scale_max: float
    rewards: np.ndarray | None = None  # [U, K] precomputed ratings (NaN = unrated), optional
    scale_step: float = 1.0

    @property
    def scale(self):
        from rlsim.data.schema import RatingScale

        return RatingScale(self.scale_min, self.scale_max, self.scale_step)

    @property
    def k(self) -> int:
        return int(self.cand_items.shape[1])

    @property
    def user_dim(self) -> int:
        return int(self.user_feat.shape[1])

    @property
    def cand_dim(self) -> int:
        return int(self.cand_feat.shape[2])

    def user_index(self) -> pd.Series:
        return pd.Series(np.arange(len(self.user_ids)), index=self.user_ids)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        np.savez(p / "env_data.npz", **arrays)
        (p / "env_data.json").write_text(json.dumps({"scale_min": self.scale_min, "scale_max": self.scale_max,
                                                     "scale_step": self.scale_step}))
        return p

    @classmethod
    def load(cls, path: str | Path) -> "EnvData":
        p = Path(path)
        if not (p / "env_data.npz").is_file():
            raise DataError(f"no env data in {p} (expected env_data.npz)")
        with np.load(p / "env_data.npz") as z:
            arrays = {k: z[k] for k in z.files}
        return cls(**arrays, **json.loads((p / "env_data.json").read_text()))

    def with_rewards(self, rewards: np.ndarray | None) -> "EnvData":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw["rewards"] = None if rewards is None else np.asarray(rewards, np.float64)
        return EnvData(**kw)


def _pca(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, components [dims, D], per-component std) fitted on rows of x."""
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    dims = min(dims, vt.shape[0])
    comp = vt[:dims]
    std = (s[:dims] / np.sqrt(max(len(x) - 1, 1))) + 1e-6
    return mean, comp, std


def build_env_data(train: pd.DataFrame, items: pd.DataFrame, candidates: pd.DataFrame, item_emb: np.ndarray,
                   scale, dims: int = 24, damping: float = 10.0) -> EnvData:
    """Feature tables for the env from training ratings, candidates and text embeddings (rows = items).

    user: taste vector in PCA space, (mean - global mean), log count, rating std.
    candidate: item PCA, user*item PCA product, damped mean - global mean, log count,
    cosine(user taste, item), its offset from the user's candidate mean, the RankZero scores.
    """
    item_ids = items["item_id"].to_numpy()
    item_index = pd.Series(np.arange(len(item_ids)), index=item_ids)
    emb = np.asarray(item_emb, np.float64)
    mean, comp, std = _pca(emb, dims)
    item_p = ((emb - mean) @ comp.T) / std
    mu = float(train["rating"].mean())
    pop = item_popularity(train, item_ids, damping)
    item_stats = np.stack([pop["damped_mean"].to_numpy() - mu,
                           np.log1p(pop["count"].to_numpy()) / np.log1p(max(pop["count"].max(), 1))], 1)

    cands = candidates.sort_values(["user_id", "rank"])
    users = np.sort(cands["user_id"].unique())
    if len(users) == 0:
        raise DataError("no candidates to build the environment from")
    K = int(cands.groupby("user_id").size().max())
    uix = pd.Series(np.arange(len(users)), index=users)
    rows = uix.reindex(cands["user_id"].to_numpy()).to_numpy()
    pos = cands.groupby("user_id").cumcount().to_numpy()
    cand_items = np.zeros((len(users), K), np.int64)
    valid = np.zeros((len(users), K), bool)
    cand_items[rows, pos] = cands["item_id"].to_numpy()
    valid[rows, pos] = True
    pop_s = np.zeros((len(users), K))
    blend_s = np.zeros((len(users), K))
    pop_s[rows, pos] = cands["pop_score"].to_numpy()
    blend_s[rows, pos] = cands["score"].to_numpy()
    missing = ~item_index.reindex(cands["item_id"].unique()).notna()
    if missing.any():
        raise DataError(f"{int(missing.sum())} candidate item(s) are not in the item table")

    taste = taste_vectors(train, users, item_index, item_emb).astype(np.float64)
    has_taste = np.linalg.norm(taste, axis=1) > 0
    user_p = np.where(has_taste[:, None], ((taste - mean) @ comp.T) / std, 0.0)
    g = train.groupby("user_id")["rating"].agg(["mean", "count", "std"]).reindex(users)
    user_mean = g["mean"].fillna(mu).to_numpy()
    user_stats = np.stack([user_mean - mu, np.log1p(g["count"].fillna(0).to_numpy()) / np.log1p(g["count"].max()),
                           g["std"].fillna(0).to_numpy()], 1)
    user_feat = np.concatenate([user_p, user_stats], 1).astype(np.float32)

    ci = item_index.reindex(cand_items.ravel()).fillna(0).to_numpy().astype(int).reshape(cand_items.shape)
    # Users in blocks, written into one float32 table: the float64 intermediates ([U, K, D] of the
    # text vectors above all) never exist for all users at once.
    dc = 2 * item_p.shape[1] + item_stats.shape[1] + 5
    cand_feat = np.empty((len(users), K, dc), np.float32)
    block = max(1, 4_000_000 // max(K * emb.shape[1], 1))
    for s in range(0, len(users), block):
        sl = slice(s, s + block)
        c, v = ci[sl], valid[sl]
        ip = item_p[c]  # [u, K, d]
        cos = np.einsum("ud,ukd->uk", taste[sl], emb[c])
        cos_off = cos - (cos * v).sum(1, keepdims=True) / np.maximum(v.sum(1, keepdims=True), 1)
        f = np.concatenate([
            ip, ip * user_p[sl][:, None, :] / np.sqrt(ip.shape[2]), item_stats[c],
            np.stack([cos * 5, cos_off * 10, pop_s[sl], blend_s[sl],
                      np.broadcast_to(np.arange(K) / K, (len(c), K))], 2),
        ], 2)
        f[~v] = 0.0
        cand_feat[sl] = f
    return EnvData(user_ids=users, cand_items=cand_items, cand_valid=valid, user_feat=user_feat,
                   cand_feat=cand_feat, pop_score=pop_s, user_mean=user_mean,
                   scale_min=float(scale.min), scale_max=float(scale.max), scale_step=float(scale.step))


def score_all(data: EnvData, source) -> np.ndarray:
    """[U, K] ratings of every valid candidate in one source call (NaN where padded or unrated)."""
    out = np.full(data.cand_items.shape, np.nan)
    v = data.cand_valid
    users = np.broadcast_to(data.user_ids[:, None], v.shape)[v]
    out[v] = np.asarray(source.score(users, data.cand_items[v]), dtype=np.float64)
    return out


def obs_layout(data: EnvData, history: int) -> dict:
    """Sizes the RLModule needs to split the flat observation back into parts."""
    return {"user_dim": data.user_dim, "cand_dim": data.cand_dim, "k": data.k, "history": history}


def make_source(cfg: dict):
    """The reward source named by an env_config: an object, or a named actor to look up."""
    if cfg.get("source") is not None:
        return cfg["source"]
    if cfg.get("simulator_actor"):
        from rlsim.simulators.actor import SimulatorClient

        return SimulatorClient(cfg["simulator_actor"], cfg.get("namespace"))
    if cfg.get("reward_actor"):
        from rlsim.sources import RemoteRewardSource

        return RemoteRewardSource(cfg["reward_actor"], cfg.get("namespace"))
    return None


class RecommendationEnv(gym.Env):
    """One episode = one training user; action = index of one of their K candidates.

    env_config keys: data (EnvData) or data_path; source (RewardSource) or reward_actor
    (+ namespace), unless data.rewards is precomputed; horizon (1); history (shown items
    kept in the observation, default min(horizon - 1, 4)); center (subtract the user's
    train mean from rewards, default True); prefetch (score all users at first reset).
    """

    metadata = {"render_modes": []}

    def __init__(self, config: dict | None = None):
        cfg = dict(config or {})
        data = cfg.get("data")
        if data is None and cfg.get("data_path"):
            data = EnvData.load(cfg["data_path"])
        if data is None:
            raise ConfigError("RecommendationEnv needs env_config 'data' (EnvData) or 'data_path'")
        self.data: EnvData = data
        self.horizon = int(cfg.get("horizon", 1))
        if self.horizon < 1:
            raise ConfigError(f"horizon must be >= 1, got {self.horizon}")
        self.history = int(cfg.get("history", min(self.horizon - 1, 4)))
        self.center = bool(cfg.get("center", True))
        self.prefetch = bool(cfg.get("prefetch", True))
        # Several one-step users per episode (horizon 1 only; train with gamma = 0).
        self.users_per_episode = int(cfg.get("users_per_episode", 1))
        if self.users_per_episode < 1 or (self.users_per_episode > 1 and self.horizon != 1):
            raise ConfigError("users_per_episode > 1 needs horizon 1")
        self._source = None if data.rewards is not None else make_source(cfg)
        if data.rewards is None and self._source is None:
            raise ConfigError("RecommendationEnv needs a reward source (source / reward_actor) or data.rewards")
        self._rewards: dict[int, np.ndarray] = {}
        if data.rewards is not None:
            self._table = data.rewards
        else:
            self._table = None
        K, Du, Dc = data.k, data.user_dim, data.cand_dim
        self._hist_dim = Dc + 1
        self.obs_dim = Du + K * Dc + self.history * self._hist_dim
        self.observation_space = gym.spaces.Dict({
            "observations": gym.spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32),
            "action_mask": gym.spaces.Box(0.0, 1.0, (K,), np.float32),
        })
        self.action_space = gym.spaces.Discrete(K)
        self._worst = data.scale_min
        self._u = 0
        self._t = 0
        self._mask = np.zeros(K, np.float32)
        self._hist = np.zeros((self.history, self._hist_dim), np.float32)
        self._base = np.zeros(Du + K * Dc, np.float32)

    # Rewards ---------------------------------------------------------------------------------
    def user_rewards(self, u: int) -> np.ndarray:
        """Ratings of user row u's K candidates, fetched once and cached."""
        if self._table is not None:
            return self._table[u]
        if u not in self._rewards:
            if self.prefetch and not self._rewards:
                self._table = score_all(self.data, self._source)
                return self._table[u]
            row = np.full(self.data.k, np.nan)
            v = self.data.cand_valid[u]
            row[v] = self._source.score(np.full(int(v.sum()), self.data.user_ids[u]), self.data.cand_items[u, v])
            self._rewards[u] = row
        return self._rewards[u]

    # Gym API ---------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._sessions = 0
        return self._new_user(options or {}), {"user_id": int(self.data.user_ids[self._u])}

    def _new_user(self, options: dict) -> dict:
        d = self.data
        for _ in range(100):
            u = int(options["user_index"]) if "user_index" in options else int(self.np_random.integers(len(d.user_ids)))
            r = self.user_rewards(u)
            mask = (d.cand_valid[u] & ~np.isnan(r)).astype(np.float32)
            if mask.any() or "user_index" in options:
                break
        self._u, self._t, self._mask = u, 0, mask
        self._hist[:] = 0.0
        self._base = np.concatenate([d.user_feat[u], d.cand_feat[u].ravel()])
        return self._obs()

    def _obs(self) -> dict:
        obs = self._base if self.history == 0 else np.concatenate([self._base, self._hist.ravel()])
        return {"observations": obs, "action_mask": self._mask.copy()}

    def step(self, action):
        a = int(action)
        d, u = self.data, self._u
        r = self.user_rewards(u)
        valid = 0 <= a < d.k and self._mask[a] > 0
        rating = float(r[a]) if valid else self._worst  # an invalid pick earns the worst rating
        reward = rating - d.user_mean[u] if self.center else rating
        if valid:
            self._mask[a] = 0.0
            if self.history:
                self._hist[1:] = self._hist[:-1]
                self._hist[0, :-1] = d.cand_feat[u, a]
                self._hist[0, -1] = rating - d.user_mean[u]
        self._t += 1
        terminated = self._t >= self.horizon or not self._mask.any()
        info = {"user_id": int(d.user_ids[u]), "item_id": int(d.cand_items[u, a]) if valid else -1,
                "rating": rating, "valid": bool(valid)}
        if terminated:
            self._sessions += 1
            if self._sessions < self.users_per_episode:
                return self._new_user({}), float(reward), False, False, info
        return self._obs(), float(reward), bool(terminated), False, info
