"""Implicit matrix factorisation by BPR (Rendle et al. 2009): a "did they watch it" ranker.

The study's implicit reference: every training rating is a positive (the user watched the movie,
whatever the stars), every other item a negative; BPR learns p_u . q_i + b_i so that a user's
watched items outrank unwatched ones. Fitted by mini-batch SGD in numpy (no maintained implicit
library is installed here). ``select_bpr`` chooses the settings on a validation slice of the
training ratings (one held-back rating per user), never on the test split, then refits on all of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from rlsim.errors import ConfigError


@dataclass
class BPR:
    factors: int = 32
    reg: float = 0.01
    lr: float = 0.05
    epochs: int = 30
    batch_size: int = 1024
    seed: int = 0

    def fit(self, train: pd.DataFrame) -> "BPR":
        if train.empty:
            raise ConfigError("BPR needs at least one training rating")
        pairs = train[["user_id", "item_id"]].drop_duplicates()
        self.users, u = np.unique(pairs["user_id"].to_numpy(), return_inverse=True)
        self.items, i = np.unique(pairs["item_id"].to_numpy(), return_inverse=True)
        nu, ni = len(self.users), len(self.items)
        rng = np.random.default_rng(self.seed)
        P = rng.normal(0, 0.1, (nu, self.factors))
        Q = rng.normal(0, 0.1, (ni, self.factors))
        b = np.zeros(ni)
        known = np.sort(u.astype(np.int64) * ni + i)
        for _ in range(self.epochs):
            order = rng.permutation(len(u))
            for s in range(0, len(order), self.batch_size):
                bu, bi = u[order[s:s + self.batch_size]], i[order[s:s + self.batch_size]]
                bj = rng.integers(0, ni, len(bu))
                # Resample negatives that are in fact watched (once: the rest are rare and harmless).
                pos = _member(known, bu.astype(np.int64) * ni + bj)
                bj[pos] = rng.integers(0, ni, int(pos.sum()))
                pu, qi, qj = P[bu], Q[bi], Q[bj]
                x = np.einsum("bf,bf->b", pu, qi - qj) + b[bi] - b[bj]
                g = 1.0 / (1.0 + np.exp(np.clip(x, -30, 30)))  # d log sigmoid(x) / dx
                np.add.at(P, bu, self.lr * (g[:, None] * (qi - qj) - self.reg * pu))
                np.add.at(Q, bi, self.lr * (g[:, None] * pu - self.reg * qi))
                np.add.at(Q, bj, self.lr * (-g[:, None] * pu - self.reg * qj))
                np.add.at(b, bi, self.lr * (g - self.reg * b[bi]))
                np.add.at(b, bj, self.lr * (-g - self.reg * b[bj]))
        self.P, self.Q, self.b = P, Q, b
        self._uix = pd.Series(np.arange(nu), index=self.users)
        self._iix = pd.Series(np.arange(ni), index=self.items)
        return self

    def score(self, users, items) -> np.ndarray:
        """Preference scores of (user, item) pairs; NaN for an item never watched in training (BPR
        knows nothing of it); an unknown user gets the item's bias (its popularity among watchers)."""
        ui = pd.Series(np.asarray(users).ravel()).map(self._uix).to_numpy(float)
        ii = pd.Series(np.asarray(items).ravel()).map(self._iix).to_numpy(float)
        ku, ki = ~np.isnan(ui), ~np.isnan(ii)
        u0, i0 = np.where(ku, ui, 0).astype(int), np.where(ki, ii, 0).astype(int)
        s = self.b[i0] + np.where(ku, np.einsum("bf,bf->b", self.P[u0], self.Q[i0]), 0.0)
        return np.where(ki, s, np.nan).reshape(np.shape(users))


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_keys, keys)
    return (pos < len(sorted_keys)) & (sorted_keys[np.minimum(pos, len(sorted_keys) - 1)] == keys)


def validation_slice(train: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fit, validation): one random rating of every user with at least two held back."""
    rng = np.random.default_rng(seed)
    df = train.reset_index(drop=True)
    counts = df.groupby("user_id")["item_id"].transform("size").to_numpy()
    key = rng.uniform(size=len(df))
    first = df.assign(_k=key)[counts >= 2].sort_values("_k").drop_duplicates("user_id").index
    val = df.loc[first]
    return df.drop(index=first), val


def validation_auc(model: BPR, fit: pd.DataFrame, val: pd.DataFrame, n_neg: int = 100, seed: int = 0) -> float:
    """Mean AUC of each held-back item against ``n_neg`` items the user did not watch in ``fit``."""
    rng = np.random.default_rng(seed)
    items = model.items
    seen = set(zip(fit["user_id"].to_numpy().tolist(), fit["item_id"].to_numpy().tolist()))
    u = val["user_id"].to_numpy()
    neg = rng.choice(items, (len(u), n_neg))
    pos_s = model.score(u, val["item_id"].to_numpy())
    neg_s = model.score(np.repeat(u[:, None], n_neg, 1), neg)
    ok_neg = np.array([[(uu, j) not in seen for j in row] for uu, row in zip(u.tolist(), neg.tolist())])
    pos_s = np.nan_to_num(pos_s, nan=-np.inf)  # a held-back item BPR never saw ranks last
    wins = ((pos_s[:, None] > neg_s) + 0.5 * (pos_s[:, None] == neg_s)) * ok_neg
    return float(np.mean(wins.sum(1) / np.maximum(ok_neg.sum(1), 1)))


def select_bpr(train: pd.DataFrame, grid: list[dict] | None = None, seed: int = 0) -> tuple[BPR, dict]:
    """The BPR settings with the best validation AUC (validation slice of ``train``), refitted on all of
    ``train``. Returns (model, {"chosen": settings, "validation_auc": {label: auc}})."""
    grid = grid or [{"factors": f, "reg": r} for f in (16, 64) for r in (0.001, 0.01, 0.1)]
    fit, val = validation_slice(train, seed)
    scores = {}
    for g in grid:
        m = replace(BPR(seed=seed), **g).fit(fit)
        scores[", ".join(f"{k}={v}" for k, v in g.items())] = (validation_auc(m, fit, val, seed=seed), g)
    best_label = max(scores, key=lambda k: scores[k][0])
    model = replace(BPR(seed=seed), **scores[best_label][1]).fit(train)
    return model, {"chosen": asdict(model), "validation_auc": {k: v[0] for k, v in scores.items()},
                   "validation": f"one held-back training rating per user ({len(val)} users), 100 sampled negatives"}
