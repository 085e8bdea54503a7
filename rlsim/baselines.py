"""Simple rating predictors every reported number is compared with.

Each has ``fit(train, scale)`` and ``predict(user_ids, item_ids)`` and knows nothing of the
test set; unknown users or items fall back to the global (or bias) estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rlsim.data.schema import RatingScale
from rlsim.metrics import ndcg_summary, rating_metrics

BASELINE_NAMES = ("global_mean", "user_mean", "rounded_user_mean", "bias", "mf")


class GlobalMean:
    name = "global_mean"

    def fit(self, train: pd.DataFrame, scale: RatingScale):
        self.mu = float(train["rating"].mean())
        self.scale = scale
        return self

    def predict(self, users, items) -> np.ndarray:
        return np.full(len(users), self.mu)


class UserMean(GlobalMean):
    name = "user_mean"

    def fit(self, train, scale):
        super().fit(train, scale)
        self.user_mean = train.groupby("user_id")["rating"].mean()
        return self

    def predict(self, users, items):
        return pd.Series(np.asarray(users)).map(self.user_mean).fillna(self.mu).to_numpy(float)


class RoundedUserMean(UserMean):
    """The user's mean snapped to the scale: an integer predictor, comparable with LLM ratings."""

    name = "rounded_user_mean"

    def predict(self, users, items):
        return self.scale.round(super().predict(users, items))


@dataclass
class BiasBaseline:
    """mu + b_u + b_i with damped (regularised) means, refined by a few alternating passes."""

    reg_user: float = 15.0
    reg_item: float = 10.0
    n_iter: int = 10
    name: str = "bias"

    def fit(self, train: pd.DataFrame, scale: RatingScale):
        self.scale = scale
        self.mu = float(train["rating"].mean())
        u = train["user_id"].to_numpy()
        i = train["item_id"].to_numpy()
        r = train["rating"].to_numpy(float) - self.mu
        self.users, uidx = np.unique(u, return_inverse=True)
        self.items, iidx = np.unique(i, return_inverse=True)
        bu, bi = np.zeros(len(self.users)), np.zeros(len(self.items))
        nu = np.bincount(uidx, minlength=len(self.users))
        ni = np.bincount(iidx, minlength=len(self.items))
        for _ in range(self.n_iter):
            bi = np.bincount(iidx, r - bu[uidx], len(self.items)) / (ni + self.reg_item)
            bu = np.bincount(uidx, r - bi[iidx], len(self.users)) / (nu + self.reg_user)
        self.bu = pd.Series(bu, index=self.users)
        self.bi = pd.Series(bi, index=self.items)
        return self

    def user_bias(self, users) -> np.ndarray:
        return pd.Series(np.asarray(users)).map(self.bu).fillna(0.0).to_numpy(float)

    def item_bias(self, items) -> np.ndarray:
        return pd.Series(np.asarray(items)).map(self.bi).fillna(0.0).to_numpy(float)

    def predict(self, users, items):
        return self.scale.clip(self.mu + self.user_bias(users) + self.item_bias(items))


@dataclass
class MatrixFactorization:
    """Biased matrix factorisation fitted by alternating least squares.

    r_ui ~ mu + b_u + b_i + p_u . q_i, with ridge penalties scaled by each row's count
    (weighted-lambda ALS), biases learned jointly by augmenting the factors with a constant.
    """

    factors: int = 20
    reg: float = 0.1
    n_iter: int = 15
    seed: int = 0
    name: str = "mf"

    def fit(self, train: pd.DataFrame, scale: RatingScale):
        self.scale = scale
        self.mu = float(train["rating"].mean())
        self.users, uidx = np.unique(train["user_id"].to_numpy(), return_inverse=True)
        self.items, iidx = np.unique(train["item_id"].to_numpy(), return_inverse=True)
        r = train["rating"].to_numpy(float) - self.mu
        rng = np.random.default_rng(self.seed)
        k = self.factors
        P = rng.normal(0, 0.1, (len(self.users), k))
        Q = rng.normal(0, 0.1, (len(self.items), k))
        bu, bi = np.zeros(len(self.users)), np.zeros(len(self.items))
        by_user = _group_index(uidx, len(self.users))
        by_item = _group_index(iidx, len(self.items))
        for _ in range(self.n_iter):
            P, bu = _als_half(by_user, iidx, r, Q, bi, self.reg)
            Q, bi = _als_half(by_item, uidx, r, P, bu, self.reg)
        self.P, self.Q, self.bu_arr, self.bi_arr = P, Q, bu, bi
        self._uix = pd.Series(np.arange(len(self.users)), index=self.users)
        self._iix = pd.Series(np.arange(len(self.items)), index=self.items)
        return self

    def predict(self, users, items):
        ui = pd.Series(np.asarray(users)).map(self._uix).to_numpy()
        ii = pd.Series(np.asarray(items)).map(self._iix).to_numpy()
        ku, ki = ~np.isnan(ui), ~np.isnan(ii)
        ui0 = np.where(ku, ui, 0).astype(int)
        ii0 = np.where(ki, ii, 0).astype(int)
        pred = np.full(len(ui), self.mu)
        pred += np.where(ku, self.bu_arr[ui0], 0.0) + np.where(ki, self.bi_arr[ii0], 0.0)
        both = ku & ki
        pred[both] += np.einsum("ij,ij->i", self.P[ui0[both]], self.Q[ii0[both]])
        return self.scale.clip(pred)


def _group_index(idx: np.ndarray, n: int) -> list[np.ndarray]:
    order = np.argsort(idx, kind="stable")
    bounds = np.searchsorted(idx[order], np.arange(n + 1))
    return [order[bounds[j]:bounds[j + 1]] for j in range(n)]


def _als_half(groups, other_idx, r, other_f, other_b, reg):
    """Solve each row's factors and bias given the other side (fixed)."""
    k = other_f.shape[1]
    F = np.zeros((len(groups), k))
    b = np.zeros(len(groups))
    eye = np.eye(k + 1)
    eye[k, k] = 0.5  # the bias is penalised less than the factors
    for j, rows in enumerate(groups):
        if len(rows) == 0:
            continue
        X = np.hstack([other_f[other_idx[rows]], np.ones((len(rows), 1))])
        y = r[rows] - other_b[other_idx[rows]]
        sol = np.linalg.solve(X.T @ X + reg * len(rows) * eye, X.T @ y)
        F[j], b[j] = sol[:k], sol[k]
    return F, b


def make_baselines(seed: int = 0) -> list:
    return [GlobalMean(), UserMean(), RoundedUserMean(), BiasBaseline(), MatrixFactorization(seed=seed)]


def fit_baselines(train: pd.DataFrame, scale: RatingScale, seed: int = 0) -> dict[str, object]:
    return {m.name: m.fit(train, scale) for m in make_baselines(seed)}


def baseline_predictions(models: dict[str, object], pairs: pd.DataFrame) -> pd.DataFrame:
    """One column per baseline with its prediction for each (user_id, item_id) row."""
    u, i = pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy()
    return pd.DataFrame({name: m.predict(u, i) for name, m in models.items()}, index=pairs.index)


def evaluate_baselines(train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale, seed: int = 0,
                       models: dict[str, object] | None = None) -> dict[str, dict]:
    """The baseline gate: each baseline's metrics on the test pairs (ndcg@10 included)."""
    models = models or fit_baselines(train, scale, seed)
    preds = baseline_predictions(models, test)
    out = {}
    for name in models:
        m = rating_metrics(test["rating"], preds[name], scale)
        m.update(ndcg_summary(test.assign(predicted=preds[name].to_numpy()), ks=(10,)))
        out[name] = m
    return out
