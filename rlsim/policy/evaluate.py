"""Per-user evaluation of a pick among each user's candidates, against random, oracles and heuristics.

Pure functions over arrays: ``rewards`` [U, K] are the simulator's expected ratings of every
candidate (NaN = unrated or padding); a strategy is one candidate index per user. "random" is
measured as the mean over each user's rated candidates (the expectation of a uniform pick), not
assumed. Two views, never mixed:
- the simulator's: mean simulated rating of the picks; "simulator_oracle" is the simulator's own
  favourite (an upper bound drawn from the simulator, not from real users) and gap_closed is
  measured against it;
- real behaviour: hit rate (share of picks that are held-out movies the user rated >= the like
  threshold; a pick without a held-out rating is a miss), the mean real rating of picks that have
  one (with its coverage), "real_oracle" (the candidate with the best real held-out rating) and the
  NDCG of each strategy's ranking of the candidates against the held-out ratings, beside its floor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.env import EnvData, ObsLayout


def initial_observations(data: EnvData, rewards: np.ndarray, history: int = 0) -> np.ndarray:
    """The first observation of every user's episode, batched: [U, ObsLayout.size] flat observations
    (rlsim.env.ObsLayout: no history yet, the candidates the rewards rate available)."""
    lay = ObsLayout.of(data, history)
    hist = np.zeros((len(data.user_ids), history, lay.hist_dim), np.float32)
    return lay.build(data.user_feat, data.cand_feat, hist, available(data, rewards))


def available(data: EnvData, rewards: np.ndarray) -> np.ndarray:
    return data.cand_valid & ~np.isnan(rewards)


def argmax_masked(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    s = np.where(mask, scores, -np.inf)
    return np.argmax(s, axis=1)


def module_logits(module, obs: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """[U, K] masked logits of an RLModule over flat observations: the policy's ranking of each user's
    candidates."""
    import torch

    from ray.rllib.core.columns import Columns

    out = []
    with torch.no_grad():
        for s in range(0, len(obs), batch_size):
            b = torch.from_numpy(np.ascontiguousarray(obs[s:s + batch_size], np.float32))
            out.append(module.forward_inference({Columns.OBS: b})[Columns.ACTION_DIST_INPUTS].numpy())
    return np.concatenate(out) if out else np.zeros((0, module.model_config["k"]), np.float32)


def module_choices(module, obs: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Greedy (argmax of masked logits) picks of an RLModule."""
    return module_logits(module, obs, batch_size).argmax(-1)


def held_out_ratings(data: EnvData, test: pd.DataFrame | None) -> np.ndarray:
    """[U, K] real held-out rating of each candidate (NaN where the user did not rate it in test)."""
    out = np.full(data.cand_items.shape, np.nan)
    if test is None or test.empty:
        return out
    t = test.drop_duplicates(["user_id", "item_id"]).set_index(["user_id", "item_id"])["rating"]
    users = np.broadcast_to(data.user_ids[:, None], data.cand_items.shape)
    idx = pd.MultiIndex.from_arrays([users.ravel(), data.cand_items.ravel()])
    out[:] = t.reindex(idx).to_numpy(float).reshape(data.cand_items.shape)
    out[~data.cand_valid] = np.nan
    return out


def _summary(per_user: np.ndarray, real: np.ndarray, like_threshold: float) -> dict:
    ok = ~np.isnan(per_user)
    has = ~np.isnan(real)
    return {"mean_reward": float(per_user[ok].mean()) if ok.any() else float("nan"),
            "std_reward": float(per_user[ok].std()) if ok.any() else float("nan"),
            "users": int(ok.sum()),
            "real_coverage": float(has[ok].mean()) if ok.any() else float("nan"),
            "mean_real_rating": float(real[has].mean()) if has.any() else float("nan"),
            "hit_rate": float((real[ok] >= like_threshold).mean()) if ok.any() else float("nan")}


def evaluate_strategies(data: EnvData, rewards: np.ndarray, choices: dict[str, np.ndarray],
                        test: pd.DataFrame | None = None, like_threshold: float = 4.0,
                        greedy_scores: np.ndarray | None = None) -> tuple[dict, pd.DataFrame]:
    """Summary per strategy plus random / simulator_oracle / real_oracle / popularity (/ greedy), and
    gap_closed of "policy" (against the simulator oracle).

    Returns (metrics, per-user table with one reward column per strategy).
    """
    rewards = np.asarray(rewards, float)
    mask = available(data, rewards)
    users_ok = mask.any(1)
    real = held_out_ratings(data, test)
    rows = np.arange(len(data.user_ids))
    picks = dict(choices)
    picks["simulator_oracle"] = argmax_masked(rewards, mask)
    picks["popularity"] = argmax_masked(data.pop_score, mask)
    picks["real_oracle"] = argmax_masked(np.nan_to_num(real, nan=-np.inf), mask)
    if greedy_scores is not None:
        picks["greedy"] = argmax_masked(np.nan_to_num(greedy_scores, nan=-np.inf), mask)
    metrics: dict = {}
    table = pd.DataFrame({"user_id": data.user_ids})
    for name, a in picks.items():
        a = np.asarray(a, int)
        picked_ok = users_ok & mask[rows, a]
        r = np.where(picked_ok, rewards[rows, a], np.nan)
        # An invalid pick by a policy counts as the worst rating, as in the env.
        r = np.where(users_ok & ~picked_ok, data.scale_min, r)
        metrics[name] = _summary(r, np.where(picked_ok, real[rows, a], np.nan), like_threshold)
        metrics[name]["invalid_picks"] = int((users_ok & ~picked_ok).sum())
        table[name] = r
    # Random: the expectation of a uniform pick over each user's rated candidates.
    n = mask.sum(1)
    rnd = np.where(users_ok, np.where(mask, rewards, 0).sum(1) / np.maximum(n, 1), np.nan)
    rmask = mask & ~np.isnan(real)
    metrics["random"] = {
        "mean_reward": float(np.nanmean(rnd)), "std_reward": float(np.nanstd(rnd)), "users": int(users_ok.sum()),
        "real_coverage": float(rmask.sum() / max(mask.sum(), 1)),
        "mean_real_rating": float(real[rmask].mean()) if rmask.any() else float("nan"),
        "hit_rate": float(np.mean((np.where(mask, np.nan_to_num(real, nan=-np.inf), -np.inf) >= like_threshold).sum(1)[users_ok]
                                  / n[users_ok])) if users_ok.any() else float("nan")}
    table["random"] = rnd
    lo, hi = metrics["random"]["mean_reward"], metrics["simulator_oracle"]["mean_reward"]
    for name in [k for k in picks if k != "simulator_oracle"]:
        raw = (metrics[name]["mean_reward"] - lo) / (hi - lo) if hi > lo else float("nan")
        metrics[name]["gap_closed"] = raw
    if "policy" in metrics:
        raw = metrics["policy"]["gap_closed"]
        metrics["gap_closed_raw"] = raw
        metrics["gap_closed"] = float(np.clip(raw, 0.0, 1.0)) if np.isfinite(raw) else float("nan")
    return metrics, table


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def slate_ndcg(data: EnvData, real: np.ndarray, scores: np.ndarray, k: int = 10) -> np.ndarray:
    """[U] NDCG@k of the top-k slate a strategy's scores make of ALL of a user's valid candidates;
    gain = the held-out rating (0 where the user has none: unwatched). NaN for a user with no
    held-out-rated candidate (nothing to find), so those users are not that metric's denominator."""
    gain = np.where(data.cand_valid, np.nan_to_num(real, nan=0.0), 0.0)
    s = np.where(data.cand_valid, np.nan_to_num(np.asarray(scores, float), nan=-np.inf), -np.inf)
    k = min(k, gain.shape[1])
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    disc = _discounts(k)
    dcg = (np.take_along_axis(gain, order, 1) * disc).sum(1)
    idcg = (-np.sort(-gain, axis=1)[:, :k] * disc).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / idcg, np.nan)


def pick_outcomes(data: EnvData, real: np.ndarray, picks: np.ndarray, like_threshold: float,
                  mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per user (0/1): ``hit`` = the pick has a held-out rating >= the like threshold (watched and
    liked); ``watched`` = the pick has any held-out rating. An invalid pick (outside ``mask``,
    default the valid candidates) is neither."""
    mask = data.cand_valid if mask is None else mask
    rows = np.arange(len(picks))
    picks = np.asarray(picks, int)
    ok = mask[rows, picks]
    r = np.where(ok, real[rows, picks], np.nan)
    return {"hit": (np.nan_to_num(r, nan=-np.inf) >= like_threshold).astype(float),
            "watched": (~np.isnan(r)).astype(float)}


def random_outcomes(data: EnvData, real: np.ndarray, like_threshold: float, k: int = 10) -> dict[str, np.ndarray]:
    """A uniform random pick's (and random slate's) expected per-user outcomes, over the valid candidates."""
    v = data.cand_valid
    n = np.maximum(v.sum(1), 1)
    liked = v & (np.nan_to_num(real, nan=-np.inf) >= like_threshold)
    watched = v & ~np.isnan(real)
    gain = np.where(v, np.nan_to_num(real, nan=0.0), 0.0)
    kk = min(k, gain.shape[1])
    disc = np.concatenate([[0.0], np.cumsum(_discounts(kk))])[np.minimum(n, kk)]
    idcg = (-np.sort(-gain, axis=1)[:, :kk] * _discounts(kk)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = np.where(idcg > 0, gain.sum(1) / n * disc / idcg, np.nan)
    return {"hit": liked.sum(1) / n, "watched": watched.sum(1) / n, "ndcg": ndcg}


def coverage(data: EnvData, picks: np.ndarray) -> dict:
    """Distinct items picked over the distinct items among these users' valid candidates."""
    picks = np.asarray(picks, int)
    items = data.cand_items[np.arange(len(picks)), picks][data.cand_valid[np.arange(len(picks)), picks]]
    pool = np.unique(data.cand_items[data.cand_valid])
    return {"coverage": float(len(np.unique(items)) / max(len(pool), 1)), "distinct_picked": int(len(np.unique(items))),
            "distinct_candidates": int(len(pool))}


def ranking_ndcg(data: EnvData, scores: dict[str, np.ndarray], real: np.ndarray, k: int = 10) -> dict:
    """NDCG@k of each strategy's ranking of a user's candidates against their held-out ratings.

    Per user, over the candidates that have a held-out rating (users with at least two such);
    ``floor`` is the expected NDCG of a random ranking of the same items (rlsim.metrics)."""
    from rlsim.metrics import ndcg_at_k, random_ndcg_at_k

    has = ~np.isnan(real) & data.cand_valid
    users = np.flatnonzero(has.sum(1) >= 2)
    out: dict = {"k": k, "users": int(len(users))}
    if not len(users):
        return out
    for name, sc in scores.items():
        out[name] = float(np.mean([ndcg_at_k(real[u, has[u]], np.nan_to_num(sc[u, has[u]], nan=-1e9), k)
                                   for u in users]))
    out["floor"] = float(np.mean([random_ndcg_at_k(real[u, has[u]], k) for u in users]))
    return out


def boxplot(table: pd.DataFrame, path: str | Path, title: str = "per-user reward") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlsim.plots import save_png

    cols = [c for c in ["random", "popularity", "greedy", "policy", "simulator_oracle"] if c in table]
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 4))
    ax.boxplot([table[c].dropna().to_numpy() for c in cols], showmeans=True)
    ax.set_xticks(range(1, len(cols) + 1), [c.replace("_", "\n") for c in cols])
    ax.set_ylabel("simulated rating of the pick")
    ax.set_title(title)
    return save_png(fig, path, dpi=100)


def evaluate_sessions(data: EnvData, rewards: np.ndarray, choose, horizon: int, history: int) -> dict:
    """Horizon > 1: mean simulated (expected) rating per pick over each user's whole session.

    choose(obs_batch) -> actions. Every user plays one session in a SessionVectorEnv over the
    static table (all users at once). Random is the mean over the user's rated candidates (a
    uniform pick without replacement has that expectation at every step); the simulator oracle
    shows the user's top-`horizon` candidates.
    """
    from rlsim.vector_env import SessionVectorEnv

    mask = available(data, rewards)
    rows = np.flatnonzero(mask.any(1))
    per_user = np.full(len(data.user_ids), np.nan)
    if len(rows):
        env = SessionVectorEnv({"data": data.with_rewards(rewards), "horizon": horizon, "history": history,
                                "center": False, "reward_mode": "static", "num_envs": len(rows)})
        obs, _ = env.reset(seed=0, options={"user_rows": rows})
        got = np.zeros(len(rows))
        done = np.zeros(len(rows), bool)
        steps = np.zeros(len(rows))
        while not done.all():
            obs, _, term, trunc, info = env.step(choose(obs))
            live = ~done & info["_rating"]
            got[live] += info["rating"][live]
            steps[live] += 1
            done |= term | trunc
        per_user[rows] = got / np.maximum(steps, 1)
    srt = -np.sort(-np.where(mask, rewards, -np.inf), axis=1)
    n = np.minimum(mask.sum(1), horizon)
    oracle = np.array([srt[i, :n[i]].mean() if n[i] else np.nan for i in range(len(n))])
    rnd = np.where(mask.any(1), np.where(mask, rewards, 0).sum(1) / np.maximum(mask.sum(1), 1), np.nan)
    out = {"horizon": horizon, "policy": {"mean_reward": float(np.nanmean(per_user))},
           "random": {"mean_reward": float(np.nanmean(rnd))},
           "simulator_oracle": {"mean_reward": float(np.nanmean(oracle))}}
    lo, hi = out["random"]["mean_reward"], out["simulator_oracle"]["mean_reward"]
    out["gap_closed"] = float((out["policy"]["mean_reward"] - lo) / (hi - lo)) if hi > lo else float("nan")
    return out
