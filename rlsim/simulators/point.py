"""Simulators built from a point predictor: the prediction, moved by the session, plus calibrated noise.

``PointSimulator`` wraps anything with ``predict(users, items)`` (the bias and MF baselines, the
offline persona): the noise model (rlsim.simulators.noise.OrdinalNoise) is fitted on a hold-out of
the training ratings that the predictor did not see, then the predictor is refitted on all of them.

The session enters as a shift of the user's level: the mean residual of the session's ratings
against the predictor's own expectations, shrunk by ``session_prior`` pseudo-ratings,
    shift_u = sum_s (r_s - mu_us) / (session_prior + |s|),
so a user who has rated the last few movies above what the model expected is expected to keep
doing so (the cheap equivalent of a persona updating its summary).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from rlsim.data.schema import RatingScale
from rlsim.data.splits import holdout_validation
from rlsim.simulators.base import Sessions, Simulator, check_sessions, has_sessions
from rlsim.simulators.noise import OrdinalNoise, user_spread


def session_shift(users: np.ndarray, sessions: Sessions, predict: Callable, prior: float) -> np.ndarray:
    """Per-pair level shift from the session's residuals (0 where the session is empty)."""
    shift = np.zeros(len(users))
    if not has_sessions(sessions):
        return shift
    rows = [j for j, s in enumerate(sessions) if len(s)]
    su = np.concatenate([[users[j]] * len(sessions[j]) for j in rows])
    si = np.concatenate([sessions[j].items for j in rows])
    sr = np.concatenate([sessions[j].ratings for j in rows])
    resid = sr - np.asarray(predict(su, si), np.float64)
    pos = 0
    for j in rows:
        n = len(sessions[j])
        shift[j] = resid[pos:pos + n].sum() / (prior + n)
        pos += n
    return shift


class PointSimulator(Simulator):
    method = "ordinal noise"
    conditions_on_session = True

    def __init__(self, name: str, predictor, noise: OrdinalNoise, scale: RatingScale, session_prior: float = 10.0):
        self.name = name
        self.predictor = predictor
        self.noise = noise
        self.scale = scale
        self.session_prior = session_prior

    @classmethod
    def fit(cls, name: str, make: Callable[[], object], train: pd.DataFrame, scale: RatingScale,
            holdout_frac: float = 0.1, seed: int = 0, session_prior: float = 10.0) -> "PointSimulator":
        """make() returns an unfitted predictor with fit(train, scale) -> itself and predict(users, items)."""
        tr, va = holdout_validation(train, holdout_frac, seed)
        inner = make().fit(tr, scale)
        mu = inner.predict(va["user_id"].to_numpy(), va["item_id"].to_numpy())
        noise = OrdinalNoise.fit(mu, va["rating"], va["user_id"], user_spread(tr), scale)
        noise.spread = user_spread(train)
        return cls(name, make().fit(train, scale), noise, scale, session_prior)

    def point(self, users, items, sessions: Sessions = None) -> np.ndarray:
        users, items = np.asarray(users), np.asarray(items)
        check_sessions(sessions, len(users))
        mu = np.asarray(self.predictor.predict(users, items), np.float64)
        return mu + session_shift(users, sessions, self.predictor.predict, self.session_prior)

    def distribution(self, users, items, sessions: Sessions = None) -> np.ndarray:
        users = np.asarray(users)
        return self.noise.distribution(self.point(users, items, sessions), users)

    def describe(self) -> dict:
        return {**super().describe(), "noise": self.noise.to_dict(), "session_prior": self.session_prior}


def baseline_simulator(name: str, train: pd.DataFrame, scale: RatingScale, seed: int = 0) -> PointSimulator:
    """bias | mf | user_mean as a simulator (residual noise per user, session shift)."""
    from rlsim.baselines import BiasBaseline, MatrixFactorization, UserMean
    from rlsim.errors import ConfigError

    makers = {"bias": BiasBaseline, "mf": lambda: MatrixFactorization(seed=seed), "user_mean": UserMean}
    if name not in makers:
        raise ConfigError(f"unknown baseline simulator '{name}' (known: {', '.join(makers)})")
    return PointSimulator.fit(name, makers[name], train, scale, seed=seed)
