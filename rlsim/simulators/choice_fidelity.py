"""Does a simulated user pick what real users went on to watch? Choice fidelity on held-out data.

Trials, after Agent4Rec: one movie the user rated in the TEST split (watched, whatever the rating)
is put among 1, 3 or 9 movies the user never rated (train or test), all from the training
catalogue. A choice model is right in a trial when the watched movie has the highest choice
probability (ties broken at random, seeded). Beside accuracy at 1:1, 1:3 and 1:9:
- ``auc``: the probability that a watched movie outranks a never-watched one, over every
  (watched, unwatched) pair of the same trial, pooled over the 1:9 trials;
- ``f1_1to9``: F1 of "would pick" (probability >= 0.5: the page odds the models are fitted at)
  against "watched", over all movies of the 1:9 trials.
Every number carries its denominator (``trials``, ``users``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

RATIOS = (1, 3, 9)


def choice_trials(train: pd.DataFrame, test: pd.DataFrame, n_negatives: int, seed: int = 0,
                  max_per_user: int = 5) -> pd.DataFrame:
    """trial, user_id, item_id, watched: one held-out watched movie + n_negatives never-rated ones each."""
    rng = np.random.default_rng(seed)
    catalogue = np.unique(train["item_id"].to_numpy())
    seen = pd.concat([train[["user_id", "item_id"]], test[["user_id", "item_id"]]])
    seen_by_user = seen.groupby("user_id")["item_id"].apply(lambda s: np.unique(s.to_numpy()))
    watched = test[test["item_id"].isin(catalogue)]
    rows, trial = [], 0
    for u, g in watched.groupby("user_id", sort=True):
        picks = np.unique(g["item_id"].to_numpy())
        if len(picks) > max_per_user:
            picks = rng.choice(picks, max_per_user, replace=False)
        unseen = np.setdiff1d(catalogue, seen_by_user[u], assume_unique=True)
        if len(unseen) < n_negatives:
            continue
        for i in picks:
            rows.append((trial, u, int(i), True))
            rows.extend((trial, u, int(j), False) for j in rng.choice(unseen, n_negatives, replace=False))
            trial += 1
    return pd.DataFrame(rows, columns=["trial", "user_id", "item_id", "watched"])


def _auc(t: pd.DataFrame) -> float:
    """Within-trial pairwise AUC (ties count one half), pooled over trials."""
    wins, pairs = 0.0, 0
    for _, g in t.groupby("trial", sort=False):
        p = g["p"].to_numpy()
        pos, neg = p[g["watched"].to_numpy()], p[~g["watched"].to_numpy()]
        wins += float((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
        pairs += len(pos) * len(neg)
    return wins / pairs if pairs else float("nan")


def choice_fidelity(choose: Callable[[np.ndarray, np.ndarray], np.ndarray], train: pd.DataFrame,
                    test: pd.DataFrame, ratios=RATIOS, seed: int = 0, max_per_user: int = 5) -> dict:
    """``choose(users, items) -> P(pick)``: a simulator's ``choice`` or a reference model's probability."""
    out: dict = {}
    for m in ratios:
        t = choice_trials(train, test, m, seed + m, max_per_user)
        if t.empty:
            out[f"1to{m}"] = {"trials": 0}
            continue
        p = np.asarray(choose(t["user_id"].to_numpy(), t["item_id"].to_numpy()), float)
        jitter = np.random.default_rng(seed).random(len(t)) * 1e-12  # seeded tie-break
        t = t.assign(p=np.nan_to_num(p, nan=-np.inf), r=np.nan_to_num(p, nan=-np.inf) + jitter)
        best = t.loc[t.groupby("trial")["r"].idxmax()]
        row = {"trials": int(t["trial"].nunique()), "users": int(t["user_id"].nunique()),
               "accuracy": float(best["watched"].mean()), "chance": 1.0 / (m + 1),
               "answered": float(np.isfinite(p).mean())}
        if m == max(ratios):
            label, truth = t["p"].to_numpy() >= 0.5, t["watched"].to_numpy()
            tp, fp, fn = int((label & truth).sum()), int((label & ~truth).sum()), int((~label & truth).sum())
            prec = tp / (tp + fp) if tp + fp else 0.0
            rec = tp / (tp + fn) if tp + fn else 0.0
            row.update(auc=_auc(t), precision=prec, recall=rec, f1=2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        out[f"1to{m}"] = row
    big = out.get(f"1to{max(ratios)}", {})
    out["summary"] = {"auc": big.get("auc"), **{f"acc_1to{m}": out[f"1to{m}"].get("accuracy") for m in ratios},
                      f"f1_1to{max(ratios)}": big.get("f1"), "trials_1to9": big.get("trials")}
    return out


def choice_session_gain(choose, train: pd.DataFrame, test: pd.DataFrame, n_negatives: int = 9, seed: int = 0,
                        max_len: int = 20, max_per_user: int = 10) -> dict:
    """Does the session help predict the NEXT pick? Each test user's held-out ratings are replayed in
    time order; at each step after the first, the next watched movie is put among ``n_negatives``
    never-rated ones, and the choice model ranks them with the earlier test movies as the session
    (watched) and without any session. ``choose(users, items, sessions)``; a positive gain means the
    session helps. On a split whose test movies are not later than the training ones (ML-100K u1)
    expect no gain: replay a temporal split (ml-latest-small temporal)."""
    from rlsim.data.schema import NO_TIMESTAMPS, has_timestamps
    from rlsim.simulators.base import Session

    if not has_timestamps(test):
        return {"trials": 0, "auc_gain": None, "note": NO_TIMESTAMPS}
    rng = np.random.default_rng(seed)
    catalogue = np.unique(train["item_id"].to_numpy())
    seen = pd.concat([train[["user_id", "item_id"]], test[["user_id", "item_id"]]])
    seen_by_user = seen.groupby("user_id")["item_id"].apply(lambda s: np.unique(s.to_numpy()))
    df = test[test["item_id"].isin(catalogue)].sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    rows, sessions, trial = [], [], 0
    for u, g in df.groupby("user_id", sort=True):
        items, ratings = g["item_id"].tolist(), g["rating"].tolist()
        unseen = np.setdiff1d(catalogue, seen_by_user[u], assume_unique=True)
        steps = list(range(1, len(items)))
        if len(unseen) < n_negatives or not steps:
            continue
        if len(steps) > max_per_user:
            steps = sorted(rng.choice(steps, max_per_user, replace=False).tolist())
        for k in steps:
            lo = max(0, k - max_len)
            sess = Session(tuple(items[lo:k]), tuple(ratings[lo:k]))
            for j, watched in [(items[k], True)] + [(int(x), False) for x in rng.choice(unseen, n_negatives,
                                                                                        replace=False)]:
                rows.append((trial, u, j, watched))
                sessions.append(sess)
            trial += 1
    t = pd.DataFrame(rows, columns=["trial", "user_id", "item_id", "watched"])
    if t.empty:
        return {"trials": 0}
    u, i = t["user_id"].to_numpy(), t["item_id"].to_numpy()
    out = {"trials": int(t["trial"].nunique()), "users": int(t["user_id"].nunique()), "negatives": n_negatives}
    jitter = np.random.default_rng(seed).random(len(t)) * 1e-12
    for name, p in (("without_session", choose(u, i, None)), ("with_session", choose(u, i, sessions))):
        tt = t.assign(p=np.nan_to_num(np.asarray(p, float), nan=-np.inf))
        tt = tt.assign(r=tt["p"] + jitter)
        best = tt.loc[tt.groupby("trial")["r"].idxmax()]
        out[name] = {"auc": _auc(tt), "accuracy": float(best["watched"].mean())}
    out["auc_gain"] = out["with_session"]["auc"] - out["without_session"]["auc"]
    out["accuracy_gain"] = out["with_session"]["accuracy"] - out["without_session"]["accuracy"]
    return out
