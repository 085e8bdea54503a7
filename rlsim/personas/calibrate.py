"""Quantile mapping of a persona's raw ratings onto the user's own rating distribution.

Fit on training ratings only: a raw rating's quantile within the persona's answers for that
user is mapped to the same quantile of the user's training ratings, then snapped to the scale.
Users with too few answers keep their raw ratings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rlsim.data.schema import RatingScale


def quantile_map(raw: np.ndarray, target: np.ndarray, scale: RatingScale) -> np.ndarray:
    raw = np.asarray(raw, float)
    ok = ~np.isnan(raw)
    out = raw.copy()
    if ok.sum() < 3 or len(target) == 0:
        return out
    # Mid-rank quantiles so ties map to the middle of their block.
    ranks = pd.Series(raw[ok]).rank(method="average").to_numpy()
    q = (ranks - 0.5) / ok.sum()
    out[ok] = scale.round(np.quantile(np.asarray(target, float), q, method="linear"))
    return out


def calibrate(pred: pd.DataFrame, train: pd.DataFrame, scale: RatingScale, col: str = "rating",
              min_answers: int = 5) -> pd.Series:
    """pred: user_id, <col> (raw persona ratings, NaN for failures) -> calibrated ratings (same index)."""
    hist = {u: g["rating"].to_numpy() for u, g in train.groupby("user_id")}
    out = pred[col].astype(float).copy()
    for u, g in pred.groupby("user_id"):
        if g[col].notna().sum() < min_answers or u not in hist:
            continue
        out.loc[g.index] = quantile_map(g[col].to_numpy(float), hist[u], scale)
    return out
