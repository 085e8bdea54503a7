"""How faithful is a simulator to real held-out behaviour? Four views, one function each.

- micro: each real held-out rating against the simulator's distribution: RMSE/MAE of the
  expectation, NLL of the real rating, exact / off_by_1 (exactly one point off) / within_1 (at most
  one point off) of the expectation snapped to the scale, per-user Spearman.
- macro: the histogram of SAMPLED ratings against the real test histogram (total variation,
  5-star share); a point prediction snapped to the scale hides the spread, a sample does not.
- discrimination (as Agent4Rec measures it): a held-out movie the user rated >= like_threshold is
  put among 1, 3 or 9 movies the user never rated; does the simulator prefer the liked one
  (accuracy: it has the highest expected rating) and label it liked (F1 of "expected rating >= the
  user's own training mean" over all movies of the trials)?
- session: each test user's held-out ratings replayed in time order; NLL of each next rating
  with the earlier ones as the session, against the same simulator without a session.

Every view takes a Simulator (rlsim.simulators.base) and plain frames of ratings; nothing here
knows what kind of simulator it is scoring.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rlsim.data.schema import RatingScale
from rlsim.metrics import rating_histogram, rating_metrics, spearman
from rlsim.simulators.base import Session, expectation, normalise, sample_from


def _nll(probs: np.ndarray, ratings: np.ndarray, scale: RatingScale) -> np.ndarray:
    p = normalise(probs)
    return -np.log(p[np.arange(len(p)), scale.to_class(ratings)])


def micro(sim, test: pd.DataFrame) -> dict:
    """Rating-level fidelity of the expectation and the distribution on (user_id, item_id, rating) pairs."""
    scale = sim.scale
    p = sim.distribution(test["user_id"].to_numpy(), test["item_id"].to_numpy())
    ok = np.isfinite(p).all(1)
    y = test["rating"].to_numpy(float)[ok]
    e = expectation(p[ok], scale)
    out = rating_metrics(y, e, scale)
    # NLL / RMSE are over the answered pairs only: coverage (answered / asked) says how many those are.
    out["nll"] = float(_nll(p[ok], y, scale).mean())
    out["coverage"] = float(ok.mean()) if len(ok) else 0.0
    out["asked"], out["answered"] = int(len(ok)), int(ok.sum())
    df = pd.DataFrame({"user_id": test["user_id"].to_numpy()[ok], "rating": y, "e": e})
    rho = [spearman(g["rating"], g["e"]) for _, g in df.groupby("user_id")]
    out["spearman_per_user"] = float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")
    return out


def macro(sim, test: pd.DataFrame, seed: int = 0) -> dict:
    """Sampled-rating histogram against the real one (seeded draws, one per test pair)."""
    scale = sim.scale
    p = sim.distribution(test["user_id"].to_numpy(), test["item_id"].to_numpy())
    ok = np.isfinite(p).all(1)
    sampled = sample_from(p[ok], scale, np.random.default_rng(seed))
    real = rating_histogram(test["rating"].to_numpy(float)[ok], scale)
    sim_h = rating_histogram(sampled, scale)
    return {"tv_sampled": 0.5 * float(np.abs(real - sim_h).sum()),
            "five_star_share": float(sim_h[-1]), "real_five_star_share": float(real[-1]),
            "sampled_histogram": sim_h.tolist(), "real_histogram": real.tolist(),
            "expected_histogram": (p[ok].mean(0) if ok.any() else np.zeros(scale.n_classes)).tolist()}


def discrimination_trials(train: pd.DataFrame, test: pd.DataFrame, n_negatives: int, like_threshold: float,
                          seed: int = 0, max_per_user: int = 5) -> pd.DataFrame:
    """trial, user_id, item_id, liked: one liked held-out movie + n_negatives never-rated movies each."""
    rng = np.random.default_rng(seed)
    catalogue = np.unique(train["item_id"].to_numpy())
    seen = pd.concat([train[["user_id", "item_id"]], test[["user_id", "item_id"]]])
    seen_by_user = seen.groupby("user_id")["item_id"].apply(lambda s: set(s.tolist()))
    liked = test[test["rating"] >= like_threshold]
    liked = liked[liked["item_id"].isin(catalogue)]
    rows, trial = [], 0
    for u, g in liked.groupby("user_id", sort=True):
        picks = g["item_id"].to_numpy()
        if len(picks) > max_per_user:
            picks = rng.choice(picks, max_per_user, replace=False)
        unseen = np.setdiff1d(catalogue, np.fromiter(seen_by_user[u], np.int64), assume_unique=False)
        if len(unseen) < n_negatives:
            continue
        for i in picks:
            negs = rng.choice(unseen, n_negatives, replace=False)
            rows.append((trial, u, int(i), True))
            rows.extend((trial, u, int(j), False) for j in negs)
            trial += 1
    return pd.DataFrame(rows, columns=["trial", "user_id", "item_id", "liked"])


def discrimination(sim, train: pd.DataFrame, test: pd.DataFrame, ratios=(1, 3, 9), like_threshold: float = 4.0,
                   seed: int = 0, max_per_user: int = 5) -> dict:
    user_mean = train.groupby("user_id")["rating"].mean()
    out = {}
    for m in ratios:
        t = discrimination_trials(train, test, m, like_threshold, seed + m, max_per_user)
        if t.empty:
            out[f"1to{m}"] = {"trials": 0}
            continue
        e = sim.score(t["user_id"].to_numpy(), t["item_id"].to_numpy())
        # Ties are broken at random (seeded), so a constant simulator scores 1/(m+1), not 1.
        jitter = np.random.default_rng(seed).random(len(t)) * 1e-9
        t = t.assign(e=np.nan_to_num(e, nan=-np.inf) + jitter)
        best = t.loc[t.groupby("trial")["e"].idxmax()]
        label = t["e"].to_numpy() >= t["user_id"].map(user_mean).to_numpy()
        truth = t["liked"].to_numpy()
        tp, fp, fn = int((label & truth).sum()), int((label & ~truth).sum()), int((~label & truth).sum())
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        out[f"1to{m}"] = {"trials": int(t["trial"].nunique()), "accuracy": float(best["liked"].mean()),
                          "chance": 1.0 / (m + 1), "precision": prec, "recall": rec,
                          "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0}
    return out


def replay_sessions(test: pd.DataFrame, max_len: int = 20) -> tuple[pd.DataFrame, list[Session]]:
    """Each test rating with the user's earlier test ratings (time order, at most max_len) as its session."""
    df = test.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    sessions: list[Session] = []
    for _, g in df.groupby("user_id", sort=False):
        items, ratings = g["item_id"].tolist(), g["rating"].tolist()
        for k in range(len(g)):
            lo = max(0, k - max_len)
            sessions.append(Session(tuple(items[lo:k]), tuple(ratings[lo:k])))
    return df, sessions


def session_gain(sim, test: pd.DataFrame, max_len: int = 20) -> dict:
    """Next-rating NLL with and without the session so far (positive gain = the session helps).
    Ratings without timestamps have no order to replay: the gain is None, with a note."""
    from rlsim.data.schema import NO_TIMESTAMPS, has_timestamps

    if not has_timestamps(test):
        return {"pairs": 0, "session_nll_gain": None, "note": NO_TIMESTAMPS,
                "conditions_on_session": bool(sim.conditions_on_session)}
    df, sessions = replay_sessions(test, max_len)
    users, items, y = df["user_id"].to_numpy(), df["item_id"].to_numpy(), df["rating"].to_numpy(float)
    p_without, p_with = sim.distribution(users, items), sim.distribution(users, items, sessions)
    without, with_s = _nll(p_without, y, sim.scale), _nll(p_with, y, sim.scale)
    asked = np.array([len(s) > 0 for s in sessions])
    # Pairs answered both ways only (a failed answer has no NLL); coverage says how many those are.
    has = asked & np.isfinite(p_without).all(1) & np.isfinite(p_with).all(1)
    e_without, e_with = expectation(p_without, sim.scale), expectation(p_with, sim.scale)
    return {"pairs": int(has.sum()), "coverage": float(has.sum() / asked.sum()) if asked.any() else 0.0,
            "nll_without_session": float(without[has].mean()),
            "nll_with_session": float(with_s[has].mean()),
            "session_nll_gain": float(without[has].mean() - with_s[has].mean()),
            "rmse_without_session": float(np.sqrt(np.mean((e_without[has] - y[has]) ** 2))),
            "rmse_with_session": float(np.sqrt(np.mean((e_with[has] - y[has]) ** 2))),
            "conditions_on_session": bool(sim.conditions_on_session)}


def fidelity(sim, train: pd.DataFrame, test: pd.DataFrame, seed: int = 0, like_threshold: float = 4.0) -> dict:
    """All four views of one simulator on one split (the keys bench/simulators.py reports)."""
    mi, ma = micro(sim, test), macro(sim, test, seed)
    di = discrimination(sim, train, test, like_threshold=like_threshold, seed=seed)
    se = session_gain(sim, test)
    return {"simulator": sim.describe(), "micro": mi, "macro": ma, "discrimination": di, "session": se,
            "rmse": mi["rmse"], "nll": mi["nll"], "coverage": mi["coverage"], "tv_sampled": ma["tv_sampled"],
            "five_star_share": ma["five_star_share"], "real_five_star_share": ma["real_five_star_share"],
            **{f"like_acc_1to{m}": di.get(f"1to{m}", {}).get("accuracy") for m in (1, 3, 9)},
            "session_nll_gain": se["session_nll_gain"]}
