"""What the recommendation environment is made of: each user's K RankZero candidates and features.

Feature tables are built once by ``build_env_data`` (a pure function of the training ratings,
candidates and item text embeddings) into an ``EnvData`` that is pickled into env_config or
saved to a folder. The environment itself (sessions stepped against a simulator, one batched
request per step) is ``rlsim.vector_env.SessionVectorEnv``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.candidates import item_popularity, taste_vectors
from rlsim.errors import DataError


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

    def __deepcopy__(self, memo):
        # Read-only tables: RLlib deep-copies env_config once per config copy, which at 10M ratings
        # meant several copies of these arrays (6.1 GB peak instead of 3.6 GB).
        return self

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

    def subset(self, rows: np.ndarray) -> "EnvData":
        """The same tables for some users only (rows of user_ids), e.g. the held-out users."""
        rows = np.asarray(rows, np.int64)
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, v in kw.items():
            if isinstance(v, np.ndarray):
                kw[name] = v[rows]
        return EnvData(**kw)

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
                   scale, dims: int = 24, damping: float = 10.0, cowatch_dims: int | None = None,
                   seed: int = 0) -> EnvData:
    """Feature tables for the env from training ratings, candidates and text embeddings (rows = items).

    user: taste vector in PCA space, (mean - global mean), log count, rating std.
    candidate: item PCA, user*item PCA product, damped mean - global mean, log count,
    cosine(user taste, item), its offset from the user's candidate mean, the RankZero scores, and
    the co-watch affinity (rlsim.cowatch: PureSVD of who watched what, ``cowatch_dims`` factors,
    None = chosen on a validation slice of the training ratings) relative to the user's best
    candidate and as a rank.
    """
    from rlsim.cowatch import CoWatch, candidate_features, select_dims

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
    if cowatch_dims is None:
        cowatch_dims, _ = select_dims(train, seed=seed)
    cw = candidate_features(CoWatch(cowatch_dims, seed).fit(train), users, cand_items, valid)
    dc = 2 * item_p.shape[1] + item_stats.shape[1] + 5 + cw.shape[2]
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
                      np.broadcast_to(np.arange(K) / K, (len(c), K))], 2), cw[sl],
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


@dataclass(frozen=True)
class ObsLayout:
    """The observation of one session: ONE float32 vector (a gymnasium Box), in this order:

    ========  ===================================  =========================================
    user      ``user_dim``                         the user's features (EnvData.user_feat)
    cands     ``k * cand_dim``                     each candidate's features, candidate-major
                                                   (EnvData.cand_feat[u].ravel())
    history   ``history * (cand_dim + 1)``         the last picks, newest first: the pick's
                                                   features and the reward it earned (zeros
                                                   before the first pick)
    mask      ``k``                                1.0 where a candidate can still be picked
    ========  ===================================  =========================================

    ``features`` (user, cands, history) is what the policy's network reads; ``mask`` its action
    mask. One flat vector instead of a Dict: RLlib's env runner and learner connectors walk a Dict
    observation with dm-tree on every step and every batch. The slices work on numpy arrays and torch
    tensors alike, over the last axis."""

    user_dim: int
    cand_dim: int
    k: int
    history: int = 0

    @classmethod
    def of(cls, data: EnvData, history: int) -> "ObsLayout":
        return cls(data.user_dim, data.cand_dim, data.k, history)

    @property
    def hist_dim(self) -> int:
        return self.cand_dim + 1

    @property
    def features(self) -> int:
        """Length of user + cands + history: the mask starts here."""
        return self.user_dim + self.k * self.cand_dim + self.history * self.hist_dim

    @property
    def size(self) -> int:
        return self.features + self.k

    def config(self) -> dict:
        """The sizes as a plain dict (the RLModule's model_config)."""
        return {"user_dim": self.user_dim, "cand_dim": self.cand_dim, "k": self.k, "history": self.history}

    def space(self):
        """The gymnasium Box of one observation: features unbounded, the mask in [0, 1]."""
        import gymnasium as gym

        low = np.concatenate([np.full(self.features, -np.inf, np.float32), np.zeros(self.k, np.float32)])
        high = np.concatenate([np.full(self.features, np.inf, np.float32), np.ones(self.k, np.float32)])
        return gym.spaces.Box(low, high, (self.size,), np.float32)

    def build(self, user_feat, cand_feat, hist, mask) -> np.ndarray:
        """[N, size] float32 observations from [N, user_dim], [N, k, cand_dim], [N, history, cand_dim + 1]
        (or None when history is 0) and [N, k]."""
        n, du, dk = len(user_feat), self.user_dim, self.k * self.cand_dim
        obs = np.empty((n, self.size), np.float32)
        obs[:, :du] = user_feat
        obs[:, du:du + dk] = cand_feat.reshape(n, dk)
        if self.history:
            obs[:, du + dk:self.features] = hist.reshape(n, -1)
        obs[:, self.features:] = mask
        return obs

    # Views of a batch of observations ([..., size]) by part.
    def user(self, obs):
        return obs[..., :self.user_dim]

    def cands(self, obs):
        """[..., k, cand_dim]."""
        du = self.user_dim
        return obs[..., du:du + self.k * self.cand_dim].reshape(*obs.shape[:-1], self.k, self.cand_dim)

    def hist(self, obs):
        """[..., history * (cand_dim + 1)], flat (newest pick first)."""
        return obs[..., self.user_dim + self.k * self.cand_dim:self.features]

    def feats(self, obs):
        """[..., features]: user, cands and history."""
        return obs[..., :self.features]

    def mask(self, obs):
        """[..., k]."""
        return obs[..., self.features:]


def obs_layout(data: EnvData, history: int) -> dict:
    """Sizes the RLModule needs to split the flat observation back into parts (ObsLayout.config)."""
    return ObsLayout.of(data, history).config()


def make_source(cfg: dict):
    """The simulator named by an env_config: an object (``source``), or a named actor to look up."""
    if cfg.get("source") is not None:
        return cfg["source"]
    if cfg.get("simulator_actor"):
        from rlsim.simulators.actor import SimulatorClient

        return SimulatorClient(cfg["simulator_actor"], cfg.get("namespace"))
    return None
