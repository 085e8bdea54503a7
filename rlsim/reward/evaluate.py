"""Metrics of a RewardPredictor on a split, beside the baselines on the same test pairs.

"model": rmse/mae/exact/off_by_1/within_1 of the expected rating, accuracy of the most likely class,
ndcg@10 (items ranked by expected rating) with ndcg_floor@10, the expected NDCG of a random ranking. Per user (train, validation, test): accuracy,
NDCG@k and the Gini of the user's training ratings, with their correlations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.baselines import evaluate_baselines
from rlsim.data.schema import RatingScale
from rlsim.metrics import NDCG_KS, ndcg_summary, pearson, per_user_gini, per_user_ndcg, rating_metrics, spearman


def split_predictions(predictor, pairs: pd.DataFrame) -> pd.DataFrame:
    proba = predictor.predict_proba(pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy())
    scale = predictor.scale
    return pairs[["user_id", "item_id", "rating"]].assign(
        predicted=proba.astype(np.float64) @ scale.values, predicted_class=scale.from_class(proba.argmax(1)))


def model_metrics(pred: pd.DataFrame, scale: RatingScale) -> dict:
    m = rating_metrics(pred["rating"], pred["predicted"], scale)
    m["accuracy"] = float(np.mean(np.isclose(pred["predicted_class"], pred["rating"])))
    m.update(ndcg_summary(pred, ks=(10,)))
    return m


def per_user_frame(pred: pd.DataFrame, split_name: str, gini: pd.Series) -> pd.DataFrame:
    hit = np.isclose(pred["predicted_class"], pred["rating"])
    acc = pd.Series(hit, index=pred.index).groupby(pred["user_id"]).mean().rename("accuracy")
    nd = per_user_ndcg(pred, ks=NDCG_KS).set_index("user_id")
    df = nd.join(acc).join(gini).reset_index()
    df.insert(1, "split", split_name)
    df["mean_ndcg"] = df[[f"ndcg@{k}" for k in NDCG_KS]].mean(axis=1)
    return df


def summarise_per_user(df: pd.DataFrame) -> dict:
    out = {}
    for name, g in df.groupby("split", sort=False):
        block = {"users": int(len(g)), "accuracy": float(g["accuracy"].mean())}
        block.update({f"ndcg@{k}": float(g[f"ndcg@{k}"].mean()) for k in NDCG_KS})
        block.update({f"ndcg_floor@{k}": float(g[f"ndcg_floor@{k}"].mean()) for k in NDCG_KS})
        block["spearman_gini_accuracy"] = spearman(g["gini"], g["accuracy"])
        block["pearson_accuracy_mean_ndcg"] = pearson(g["accuracy"], g["mean_ndcg"])
        out[name] = block
    return out


def evaluate_predictor(predictor, train: pd.DataFrame, test: pd.DataFrame, seed: int = 0,
                       validation: pd.DataFrame | None = None, fit_train: pd.DataFrame | None = None,
                       baselines: bool = True) -> tuple[dict, pd.DataFrame]:
    """(metrics, per-user frame). train is the whole training split (the baselines fit on it);
    fit_train, when given, is the part the model saw (validation carved out), used for "train"."""
    scale = predictor.scale
    gini = per_user_gini(train, scale)
    parts = {"train": fit_train if fit_train is not None else train, "test": test}
    if validation is not None and len(validation):
        parts = {"train": parts["train"], "validation": validation, "test": test}
    preds = {name: split_predictions(predictor, df) for name, df in parts.items()}
    per_user = pd.concat([per_user_frame(p, name, gini) for name, p in preds.items()], ignore_index=True)
    metrics = {"model": model_metrics(preds["test"], scale),
               "train_fit": model_metrics(preds["train"], scale),
               "per_user": summarise_per_user(per_user)}
    if baselines:
        metrics["baselines"] = evaluate_baselines(train, test, scale, seed=seed)
    return metrics, per_user


def write_plots(per_user: pd.DataFrame, out_dir: Path, title: str = "") -> list[Path]:
    """Box plots of per-user accuracy and NDCG@10, one box per split."""
    from rlsim.plots import boxplot, grouped_boxplot

    out_dir = Path(out_dir)
    paths = [boxplot({s: g["accuracy"].dropna().to_numpy() for s, g in per_user.groupby("split", sort=False)},
                     f"Per-user accuracy {title}".strip(), "accuracy", out_dir / "accuracy_boxplot.png")]
    groups = {s: {f"@{k}": g[f"ndcg@{k}"].dropna().to_numpy() for k in NDCG_KS}
              for s, g in per_user.groupby("split", sort=False)}
    paths.append(grouped_boxplot(groups, f"Per-user NDCG@k {title}".strip(), "NDCG", out_dir / "ndcg_boxplot.png"))
    return paths
