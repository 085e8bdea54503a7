"""A calibrated ordinal noise model: turns a point prediction into a distribution over the scale.

Ordered probit: P(rating <= v_c) = Phi((theta_c - mu) / sigma_u), with C-1 increasing cut points
theta and a per-user spread sigma_u = exp(a + b * log(sd_u + 0.25)), where sd_u is the spread of the
user's own training ratings (users who use the whole scale get wider answers). The C+1 parameters
are fitted by maximum likelihood on ratings the point model did NOT see (a hold-out of the
training ratings), so the spread is the model's real error, not its training fit, and the
sampled ratings reproduce the rating histogram (a point prediction snapped to the scale almost
never answers 1 or 5). Used for the baselines, the offline persona and an LLM answer without
logprobs or samples ("answer + calibrated noise").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize
from scipy.special import ndtr

from rlsim.data.schema import RatingScale


def user_spread(ratings: pd.DataFrame, prior_weight: float = 5.0) -> pd.Series:
    """Per-user sd of training ratings, shrunk towards the global sd by `prior_weight` ratings."""
    g = ratings.groupby("user_id")["rating"].agg(["var", "count"])
    glob = float(ratings["rating"].var()) if len(ratings) > 1 else 1.0
    var = (g["var"].fillna(glob) * (g["count"] - 1).clip(lower=0) + prior_weight * glob) / \
        ((g["count"] - 1).clip(lower=0) + prior_weight)
    return np.sqrt(var).rename("sd")


@dataclass
class OrdinalNoise:
    scale: RatingScale
    cuts: np.ndarray  # [C-1] increasing
    a: float
    b: float
    spread: pd.Series = field(repr=False)  # user_id -> sd of training ratings
    default_sd: float = 1.0

    @staticmethod
    def _unpack(x: np.ndarray, n_cuts: int):
        cuts = x[0] + np.concatenate([[0.0], np.cumsum(np.exp(x[1:n_cuts]))])
        return cuts, x[n_cuts], x[n_cuts + 1]

    @staticmethod
    def _probs(mu: np.ndarray, log_sd: np.ndarray, cuts: np.ndarray, a: float, b: float) -> np.ndarray:
        sigma = np.exp(a + b * log_sd)
        z = (cuts[None, :] - mu[:, None]) / sigma[:, None]
        cdf = np.concatenate([np.zeros((len(mu), 1)), ndtr(z), np.ones((len(mu), 1))], 1)
        return np.diff(cdf, axis=1)

    @classmethod
    def fit(cls, mu, ratings, user_ids, spread: pd.Series, scale: RatingScale) -> "OrdinalNoise":
        """Maximum likelihood on (prediction, real rating) pairs the predictor did not train on."""
        mu = np.asarray(mu, np.float64)
        y = scale.to_class(np.asarray(ratings, np.float64))
        default = float(np.median(spread.to_numpy())) if len(spread) else 1.0
        log_sd = np.log(pd.Series(np.asarray(user_ids)).map(spread).fillna(default).to_numpy() + 0.25)
        n_cuts = scale.n_classes - 1
        mids = scale.values[:-1] + scale.step / 2
        x0 = np.concatenate([[mids[0]], np.log(np.diff(mids)) if n_cuts > 1 else [], [np.log(0.9), 0.0]])

        def nll(x):
            cuts, a, b = cls._unpack(x, n_cuts)
            p = cls._probs(mu, log_sd, cuts, a, b)[np.arange(len(y)), y]
            return -np.sum(np.log(np.clip(p, 1e-12, None))) / len(y)

        res = optimize.minimize(nll, x0, method="L-BFGS-B")
        cuts, a, b = cls._unpack(res.x, n_cuts)
        return cls(scale, cuts, float(a), float(b), spread, default)

    def distribution(self, mu, user_ids) -> np.ndarray:
        mu = np.asarray(mu, np.float64)
        sd = pd.Series(np.asarray(user_ids)).map(self.spread).fillna(self.default_sd).to_numpy()
        p = self._probs(np.nan_to_num(mu, nan=0.0), np.log(sd + 0.25), self.cuts, self.a, self.b)
        p[np.isnan(mu)] = np.nan  # no answer stays no answer
        return p

    def to_dict(self) -> dict:
        return {"cuts": self.cuts.round(4).tolist(), "a": round(self.a, 4), "b": round(self.b, 4)}
