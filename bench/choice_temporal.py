"""Choice models on ml-latest-small's temporal split, judged as the study judges policies ->
bench/results/choice_temporal.json.

The study's real hit rate asks of a policy's FIRST pick among a user's RankZero candidates whether
the user went on to watch it (and like it, >= 4). Here each choice model makes that pick itself
(the candidate it gives the highest pick probability) beside popularity-first (the candidates'
RankZero popularity score) and BPR top-1 (rlsim.bpr.select_bpr, the study's implicit reference):
- ``validation``: fitted on the training ratings less each user's last 20% by time (the temporal
  split's own rule, rlsim.data.splits.temporal_validation); the target is that last 20%; the
  candidates are RankZero's from the rest (weights chosen inside it). Test data is never read.
- ``test``: fitted on all training ratings; the target is the held-out test split (every user).
Per strategy: ``watched`` / ``liked`` (share of users whose top-1 is watched / liked in the target)
and ``candidate_auc`` (per user with a watched and an unwatched candidate: P(a watched candidate
outranks an unwatched one), averaged). Each choice model twice: ``<name>`` with the time-local
popularity feature (rlsim.recency; its setting chosen on the model's own link slice) and
``<name>_time_blind`` without it; ``default`` says which one the model uses unless told. For them
also ``auc``: choice_fidelity's 1:9 trials (a watched target movie vs 9 never-rated ones), pooled.
Every difference (from popularity-first, BPR top-1, the time-blind twin) is paired over users, with
a bootstrap interval over users (2,000 replicates).

    python bench/choice_temporal.py [--data-dir ../shared/datasets] [--cache-dir .cache] [--only validation]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/

from _child import write_result  # noqa: E402

LIKE = 4.0
N_BOOT = 2000


def top1(cands: pd.DataFrame, target: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    """Per user with a target rating: is the top-scored candidate watched / liked; candidate AUC."""
    c = cands.assign(s=np.nan_to_num(np.asarray(scores, float), nan=-np.inf))
    c = c[c["user_id"].isin(target["user_id"])]
    best = c.loc[c.groupby("user_id")["s"].idxmax()]
    t = target.drop_duplicates(["user_id", "item_id"], keep="last").set_index(["user_id", "item_id"])["rating"]
    r = t.reindex(pd.MultiIndex.from_frame(best[["user_id", "item_id"]])).to_numpy()
    out = pd.DataFrame({"user_id": best["user_id"].to_numpy(), "watched": ~np.isnan(r), "liked": r >= LIKE})
    w = ~np.isnan(t.reindex(pd.MultiIndex.from_frame(c[["user_id", "item_id"]])).to_numpy())
    c = c.assign(w=w, rk=c.groupby("user_id")["s"].rank())
    g = c.groupby("user_id")
    npos, n = g["w"].sum(), g.size()
    sumrank = c[c["w"]].groupby("user_id")["rk"].sum().reindex(npos.index).fillna(0)
    auc = (sumrank - npos * (npos + 1) / 2) / (npos * (n - npos)).replace(0, np.nan)
    out["candidate_auc"] = auc.reindex(out["user_id"]).to_numpy()
    return out.set_index("user_id")


def trial_wins(model_p, trials: pd.DataFrame) -> pd.DataFrame:
    """Per user: AUC wins and pairs over their 1:9 trials (watched vs never-rated)."""
    p = np.nan_to_num(np.asarray(model_p(trials["user_id"].to_numpy(), trials["item_id"].to_numpy()), float),
                      nan=-np.inf)
    t = trials.assign(p=p)
    pos = t[t["watched"]].set_index("trial")["p"]
    neg = t[~t["watched"]]
    pp = pos.reindex(neg["trial"]).to_numpy()
    win = (pp > neg["p"].to_numpy()) + 0.5 * (pp == neg["p"].to_numpy())
    return pd.DataFrame({"user_id": neg["user_id"].to_numpy(), "wins": win, "pairs": 1.0}).groupby("user_id").sum()


def _plain(v):
    """A chosen setting for JSON: a time kernel's infinite user half-life as "inf" (JSON has no inf)."""
    if isinstance(v, tuple):
        return [x if np.isfinite(x) else "inf" for x in v]
    return v


def boot_idx(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, (N_BOOT, n))


def mean_ci(a: np.ndarray, idx: np.ndarray) -> dict:
    ok = ~np.isnan(a)
    a0 = np.where(ok, a, 0.0)
    bs = (a0[idx].sum(1) / np.maximum(ok[idx].sum(1), 1))
    return {"mean": float(a0.sum() / max(ok.sum(), 1)), "ci95": [float(np.percentile(bs, 2.5)),
                                                                  float(np.percentile(bs, 97.5))]}


def ratio_ci(wins: np.ndarray, pairs: np.ndarray, idx: np.ndarray) -> dict:
    bs = wins[idx].sum(1) / pairs[idx].sum(1)
    return {"mean": float(wins.sum() / pairs.sum()), "ci95": [float(np.percentile(bs, 2.5)),
                                                              float(np.percentile(bs, 97.5))]}


def evaluate(fit: pd.DataFrame, target: pd.DataFrame, cands: pd.DataFrame, seed: int) -> dict:
    from rlsim.bpr import select_bpr
    from rlsim.simulators.choice import CHOICE_MODELS, PopularityChoice
    from rlsim.simulators.choice_fidelity import choice_trials

    u, i = cands["user_id"].to_numpy(), cands["item_id"].to_numpy()
    trials = choice_trials(fit, target, 9, seed + 9)  # the 1:9 trials of choice_fidelity
    outs, wins, about = {"popularity_first": top1(cands, target, cands["pop_score"].to_numpy())}, {}, {}
    bpr, chosen = select_bpr(fit, seed=seed)
    outs["bpr_top1"] = top1(cands, target, bpr.score(u, i))
    about["bpr_top1"] = {"chosen": {k: chosen["chosen"][k] for k in ("factors", "reg")}}
    for name in CHOICE_MODELS:
        for label, grid in (("time_blind", (None,)), ("recency", PopularityChoice.RECENCY)):
            key = f"{name}" if label == "recency" else f"{name}_time_blind"
            m = CHOICE_MODELS[name](seed=seed, recency_grid=grid).fit(fit)
            outs[key] = top1(cands, target, m.probability(u, i))
            wins[key] = trial_wins(m.probability, trials)
            about[key] = {"default": CHOICE_MODELS[name].RECENCY == grid,
                          "chosen": {k: _plain(v) for k, v in m.chosen.items()},
                          "validation_log_loss": m.validation_log_loss}
            print(key, about[key], float(outs[key]["watched"].mean()), flush=True)
    users = outs["popularity_first"].index
    idx = boot_idx(len(users), seed)
    res = {"users": int(len(users)), "strategies": {}}
    for key, o in outs.items():
        o = o.reindex(users)
        row = {m: mean_ci(o[m].to_numpy(float), idx) for m in ("watched", "liked", "candidate_auc")}
        row["candidate_auc"]["users"] = int(o["candidate_auc"].notna().sum())
        for ref in ("popularity_first", "bpr_top1") + ((key + "_time_blind",) if key + "_time_blind" in outs else ()):
            if ref == key:
                continue
            b = outs[ref].reindex(users)
            row[f"vs_{ref}"] = {m: mean_ci(o[m].to_numpy(float) - b[m].to_numpy(float), idx)
                                for m in ("watched", "liked", "candidate_auc")}
        if key in wins:
            wu = wins[key].index
            widx = boot_idx(len(wu), seed)
            row["auc"] = {**ratio_ci(wins[key]["wins"].to_numpy(), wins[key]["pairs"].to_numpy(), widx),
                          "users": int(len(wu)), "trials": int(trials["trial"].nunique())}
            if key + "_time_blind" in wins:
                b = wins[key + "_time_blind"].reindex(wu)
                d = (wins[key]["wins"].to_numpy() - b["wins"].to_numpy())
                bs = d[widx].sum(1) / wins[key]["pairs"].to_numpy()[widx].sum(1)
                row["auc"]["vs_time_blind"] = {"mean": float(d.sum() / wins[key]["pairs"].sum()),
                                               "ci95": [float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))]}
        res["strategies"][key] = {**row, **about.get(key, {})}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    p.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", str(REPO / ".cache")))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "choice_temporal.json"))
    p.add_argument("--only", choices=("validation", "test"))
    args = p.parse_args(argv)
    from rlsim.candidates import CandidatesConfig, build_candidates, choose_weights
    from rlsim.config import DataConfig
    from rlsim.data import load_split
    from rlsim.data.splits import temporal_validation
    from rlsim.embeddings import item_text_vectors

    t0 = time.perf_counter()
    dcfg = DataConfig(dataset="ml-latest-small", split="temporal", data_dir=args.data_dir, cache_dir=args.cache_dir,
                      download=False)
    ds, split = load_split(dcfg)
    emb = item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir)
    out = {"dataset": "ml-latest-small/temporal", "like_threshold": LIKE, "bootstrap": {
        "replicates": N_BOOT, "over": "users (paired: the same users and candidates for every strategy)"}}
    stages = {"validation": lambda: temporal_validation(split.train, 0.2, dcfg.seed),
              "test": lambda: (split.train, split.test)}
    for stage, make in stages.items():
        if args.only and stage != args.only:
            continue
        fit, target = make()
        cfg = CandidatesConfig()
        tuning = choose_weights(fit, ds.items, emb, cfg, dcfg.seed)
        cfg = replace(cfg, pop_weight=tuning["chosen"]["pop"], sim_weight=tuning["chosen"]["sim"])
        cands = build_candidates(fit, ds.items, emb, cfg)
        out[stage] = {"fit_ratings": int(len(fit)), "target_ratings": int(len(target)),
                      "candidates": {"k": cfg.k, "weights": tuning["chosen"]}, **evaluate(fit, target, cands, dcfg.seed)}
        print(stage, "done", round(time.perf_counter() - t0, 1), flush=True)
    out["validation_rule"] = "last 20% of each user's training ratings by time (the temporal split's own rule)"
    return write_result(out, args.out, "choice_temporal.py", argv, t0)


if __name__ == "__main__":
    raise SystemExit(main())
