"""Rating and ranking metrics, each a plain function of arrays or a (user_id, rating, predicted) frame.

Conventions: ``exact``, ``off_by_1`` and ``within_1`` snap predictions to the nearest valid rating
on the dataset's scale first (so a continuous model and an integer LLM answer are comparable), and
are fractions in 0..1. ``off_by_1`` is EXACTLY one rating point off (as the Lusifer paper counts
it); ``within_1`` is at most one point off (exact + off_by_1). NDCG uses the real rating as the gain of each of a user's test items,
ranked by the prediction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from rlsim.data.schema import RatingScale

NDCG_KS = (3, 5, 10, 15, 20, 25, 50, 100)


def rmse(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    return float(np.sqrt(np.mean((y - p) ** 2)))


def mae(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    return float(np.mean(np.abs(y - p)))


def exact(y, p, scale: RatingScale) -> float:
    return float(np.mean(np.isclose(scale.round(p), np.asarray(y, float))))


def _snapped_error(y, p, scale: RatingScale) -> np.ndarray:
    return np.abs(scale.round(p) - np.asarray(y, float))


def off_by_1(y, p, scale: RatingScale) -> float:
    """Share of predictions exactly one rating point (not one step) from the truth."""
    return float(np.mean(np.isclose(_snapped_error(y, p, scale), 1.0)))


def within_1(y, p, scale: RatingScale) -> float:
    """Share of predictions at most one rating point from the truth (exact + off_by_1)."""
    return float(np.mean(_snapped_error(y, p, scale) <= 1.0 + 1e-9))


def rating_metrics(y, p, scale: RatingScale) -> dict[str, float]:
    return {"rmse": rmse(y, p), "mae": mae(y, p), "exact": exact(y, p, scale), "off_by_1": off_by_1(y, p, scale),
            "within_1": within_1(y, p, scale), "n": int(len(np.asarray(y)))}


def dcg(gains: np.ndarray) -> float:
    discounts = 1.0 / np.log2(np.arange(2, len(gains) + 2))
    return float(np.sum(np.asarray(gains, float) * discounts))


def ndcg_at_k(true: np.ndarray, pred: np.ndarray, k: int) -> float:
    """NDCG@k of one user's items: rank by pred, gain = true rating. Ties in pred keep input order."""
    true, pred = np.asarray(true, float), np.asarray(pred, float)
    if len(true) == 0:
        return float("nan")
    order = np.argsort(-pred, kind="stable")[:k]
    ideal = np.sort(true)[::-1][:k]
    idcg = dcg(ideal)
    return dcg(true[order]) / idcg if idcg > 0 else float("nan")


def random_ndcg_at_k(true: np.ndarray, k: int) -> float:
    """Expected NDCG@k of a uniformly random ranking of one user's items: the floor any ranking
    must beat. Every position's expected gain is the mean gain, so E[DCG@k] is exact, not sampled."""
    true = np.asarray(true, float)
    if len(true) == 0:
        return float("nan")
    idcg = dcg(np.sort(true)[::-1][:k])
    expected = float(true.mean()) * float(np.sum(1.0 / np.log2(np.arange(2, min(k, len(true)) + 2))))
    return expected / idcg if idcg > 0 else float("nan")


def per_user_ndcg(df: pd.DataFrame, ks=NDCG_KS, pred_col: str = "predicted") -> pd.DataFrame:
    """One row per user with ndcg@k and ndcg_floor@k (random ranking) columns; df has user_id,
    rating and the prediction column."""
    rows = []
    for uid, g in df.groupby("user_id", sort=True):
        t, p = g["rating"].to_numpy(), g[pred_col].to_numpy()
        rows.append({"user_id": uid, "n_items": len(g), **{f"ndcg@{k}": ndcg_at_k(t, p, k) for k in ks},
                     **{f"ndcg_floor@{k}": random_ndcg_at_k(t, k) for k in ks}})
    return pd.DataFrame(rows)


def ndcg_summary(df: pd.DataFrame, ks=(10,), pred_col: str = "predicted") -> dict[str, float]:
    """Mean per-user ndcg@k with its floor (the expected NDCG of a random ranking) beside it: an
    NDCG means little without it (on ML-100K u1 a constant predictor already scores ~0.83)."""
    nd = per_user_ndcg(df, ks=ks, pred_col=pred_col)
    out = {}
    for k in ks:
        out[f"ndcg@{k}"] = float(nd[f"ndcg@{k}"].mean()) if len(nd) else float("nan")
        out[f"ndcg_floor@{k}"] = float(nd[f"ndcg_floor@{k}"].mean()) if len(nd) else float("nan")
    return out


def per_user_accuracy(df: pd.DataFrame, scale: RatingScale, pred_col: str = "predicted") -> pd.Series:
    hit = np.isclose(scale.round(df[pred_col].to_numpy()), df["rating"].to_numpy())
    return pd.Series(hit, index=df.index).groupby(df["user_id"]).mean().rename("accuracy")


def gini(ratings, scale: RatingScale) -> float:
    """Gini coefficient of a user's rating histogram over the scale's classes.

    0 when every rating value is used equally often, towards 1 when one value dominates
    (a user who rates everything 4 is easy to predict; the paper correlates this with accuracy).
    """
    counts = np.bincount(scale.to_class(ratings), minlength=scale.n_classes).astype(float)
    if counts.sum() == 0:
        return float("nan")
    x = np.sort(counts)
    n = len(x)
    cum = np.cumsum(x)
    return float((n + 1 - 2 * np.sum(cum) / cum[-1]) / n)


def per_user_gini(ratings: pd.DataFrame, scale: RatingScale) -> pd.Series:
    return ratings.groupby("user_id")["rating"].apply(lambda r: gini(r.to_numpy(), scale)).rename("gini")


def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return float("nan")
    return float(stats.spearmanr(x[ok], y[ok]).statistic)


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return float("nan")
    return float(stats.pearsonr(x[ok], y[ok]).statistic)


def rating_histogram(ratings, scale: RatingScale) -> np.ndarray:
    counts = np.bincount(scale.to_class(ratings), minlength=scale.n_classes).astype(float)
    return counts / counts.sum() if counts.sum() else counts


def histogram_distance(real, simulated, scale: RatingScale) -> dict[str, float]:
    """Total variation and 1-Wasserstein (in rating points) between two rating histograms."""
    a, b = rating_histogram(real, scale), rating_histogram(scale.round(simulated), scale)
    tv = 0.5 * float(np.abs(a - b).sum())
    w1 = float(np.abs(np.cumsum(a) - np.cumsum(b)).sum() * scale.step)
    return {"total_variation": tv, "wasserstein": w1}


def nan_to_none(obj):
    """JSON-safe copy: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
