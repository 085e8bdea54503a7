"""Fidelity of persona ratings against the real held-out ratings of the same users and items.

close_match: |predicted - real| <= 0.5 (the unsnapped prediction within half a point).
exact / off_by_1 (exactly one point off) / within_1 (at most one point off) snap the prediction to the
scale first (rlsim.metrics conventions).
Every result carries the baseline gate fitted on the same training ratings and evaluated on
the same (rated) pairs, and the reward model's numbers on those pairs when one is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.baselines import evaluate_baselines
from rlsim.data.schema import RatingScale
from rlsim.metrics import histogram_distance, ndcg_summary, rating_histogram, rating_metrics, spearman


def fidelity_metrics(df: pd.DataFrame, scale: RatingScale, pred_col: str = "predicted", k: int = 10) -> dict:
    """df: user_id, rating (real), <pred_col>; rows with a NaN prediction must be removed first."""
    y, p = df["rating"].to_numpy(float), df[pred_col].to_numpy(float)
    if len(y) == 0:
        return {"n": 0}
    m = rating_metrics(y, p, scale)
    m["close_match"] = float(np.mean(np.abs(p - y) <= 0.5 + 1e-9))
    rho = [spearman(g["rating"], g[pred_col]) for _, g in df.groupby("user_id")]
    m["spearman_per_user"] = float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")
    m.update(ndcg_summary(df, ks=(k,), pred_col=pred_col))
    m["histogram"] = histogram_distance(y, p, scale)
    top = scale.max
    m["five_star_share"] = float(np.mean(scale.round(p) == top))
    m["real_five_star_share"] = float(np.mean(y == top))
    m["simulated_histogram"] = rating_histogram(scale.round(p), scale).tolist()
    m["real_histogram"] = rating_histogram(y, scale).tolist()
    return m


def evaluate_persona(train: pd.DataFrame, pairs: pd.DataFrame, scale: RatingScale, seed: int = 0,
                     reward_predictor=None, k: int = 10) -> dict:
    """pairs: user_id, item_id, rating (real), predicted (NaN = failed) [, predicted_raw]."""
    ok = pairs["predicted"].notna()
    rated = pairs[ok].reset_index(drop=True)
    out = {"pairs": int(len(pairs)), "rated": int(ok.sum()), "coverage": float(ok.mean()) if len(pairs) else 0.0,
           "persona": fidelity_metrics(rated, scale, "predicted", k)}
    if "predicted_raw" in rated and not np.allclose(rated["predicted_raw"], rated["predicted"]):
        raw = fidelity_metrics(rated, scale, "predicted_raw", k)
        out["persona_unsnapped"] = {key: raw[key] for key in ("rmse", "mae", "close_match", f"ndcg@{k}",
                                                            f"ndcg_floor@{k}")}
    out["baselines"] = evaluate_baselines(train, rated[["user_id", "item_id", "rating"]], scale, seed=seed) \
        if len(rated) else {}
    if reward_predictor is not None and len(rated):
        rp = np.asarray(reward_predictor.predict(rated["user_id"].to_numpy(), rated["item_id"].to_numpy()), float)
        out["reward_model"] = fidelity_metrics(rated.assign(reward_pred=rp), scale, "reward_pred", k)
        pairs.loc[ok, "reward_model"] = rp
    return out


def plot_histograms(result: dict, scale: RatingScale, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlsim.plots import save_png

    vals = scale.values
    w = 0.38 * scale.step
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.bar(vals - w / 2, result["persona"]["real_histogram"], width=w, label="real (held out)")
    ax.bar(vals + w / 2, result["persona"]["simulated_histogram"], width=w, label="persona")
    if "reward_model" in result:
        ax.plot(vals, result["reward_model"]["simulated_histogram"], "k.--", label="reward model")
    ax.set_xlabel("rating")
    ax.set_ylabel("share")
    ax.set_xticks(vals)
    ax.set_title(title or "Rating histogram: real vs simulated")
    ax.legend()
    return save_png(fig, path)
