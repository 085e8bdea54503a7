"""The steps the study and its hybrid curve share: the pipeline's reward and candidates stages into the
study folder, the `policy:` section sized to the study's env steps, a trained policy's held-out rows,
judging one policy on them, and a mean with its interval over seeds."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from rlsim.run_config import RunConfig


def mean_ci(xs) -> dict:
    """Mean with a 95% t-interval over seeds (None when there is one seed)."""
    from scipy import stats

    a = np.asarray([x for x in xs if x is not None and np.isfinite(x)], float)
    if not len(a):
        return {"mean": None, "ci95": None, "n": 0}
    half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else None
    return {"mean": float(a.mean()), "ci95": None if half is None else [float(a.mean() - half), float(a.mean() + half)],
            "n": int(len(a))}


def judge_policy(data, rows, module, history, tables: dict[str, np.ndarray], train_table: np.ndarray,
                 test: pd.DataFrame, like: float, k: int) -> dict:
    """One trained policy on one seed's held-out users: the mean rating every source gives its
    picks, the real view (with random / popularity-first / real oracle on the same users), and the
    per-user real outcomes (``outcomes``: hit, watched, slate NDCG; ``coverage``) for the bootstrap."""
    from rlsim.policy.evaluate import available, held_out_ratings, initial_observations, module_logits
    from rlsim.policy.run import judge_users
    from rlsim.study_real import strategy_outcomes

    metrics, _, picks = judge_users(data, rows, train_table, module, history, test, like, k)
    sub = data.subset(rows)
    idx = np.arange(len(rows))
    by_source = {}
    for name, t in tables.items():
        v = t[rows][idx, picks]
        ok = sub.cand_valid[idx, picks] & np.isfinite(v)
        by_source[name] = float(v[ok].mean()) if ok.any() else None
    # The policy's own ranking: its masked logits (what the env lets it pick), as judge_users' picks.
    r = train_table[rows]
    logits = module_logits(module, initial_observations(sub, r, history))
    outcomes, cov = strategy_outcomes(sub, held_out_ratings(sub, test), logits, like, k, available(sub, r))
    return {"by_source": by_source, "real": {n: {key: metrics[n].get(key) for key in
                                                 ("hit_rate", "mean_real_rating", "real_coverage")}
                                             for n in ("policy", "random", "popularity", "real_oracle")},
            "ndcg": metrics["ndcg"], "gap_closed_own_simulator": metrics.get("gap_closed"),
            "outcomes": outcomes, "coverage": cov}


def held_out_rows(data, run_dir: Path) -> np.ndarray:
    """The held-out rows of a trained run: run.json's ids are the truth (as in evaluate_policy)."""
    from rlsim.policy.run import load_run

    ids = np.asarray(load_run(run_dir).get("users", {}).get("held_out_user_ids", []), np.int64)
    return np.flatnonzero(np.isin(data.user_ids, ids))


def reward_stage(run: "RunConfig", out: Path, loaded: tuple, progress: bool) -> str:
    """The pipeline's reward stage into OUT/reward (kept when its checkpoint exists); its checkpoint."""
    from rlsim.pipeline import make_context, run_stage

    ckpt = out / "reward" / "checkpoint"
    if not (ckpt / "model.pt").is_file():
        run_stage(make_context(run, out, progress=progress, loaded=loaded), "reward", force=True)
    return str(ckpt)


def candidates_stage(run: "RunConfig", out: Path, loaded: tuple) -> tuple[dict, pd.DataFrame]:
    """The pipeline's candidates stage into OUT/candidates (always rewritten): (its metrics, the candidates)."""
    from rlsim.pipeline import make_context, run_stage

    metrics, _ = run_stage(make_context(run, out, progress=False, loaded=loaded), "candidates", force=True)
    return metrics, pd.read_parquet(out / "candidates" / "candidates.parquet")


def policy_base(run: "RunConfig", env_steps: int | None = None):
    """The `policy:` section with as many iterations as reach env_steps (default study.env_steps)."""
    base = run.policy
    steps = run.study.env_steps if env_steps is None else env_steps
    return replace(base, iterations=max(1, math.ceil(steps / base.train_batch_size))).validate()
