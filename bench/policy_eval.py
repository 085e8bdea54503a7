"""Honest policy evaluation on ML-100K u1 -> bench/results/policy_eval.json.

PPO (library defaults: 15 iterations, sampled ratings) is trained against the reward model on the
training users, over several seeds (each seed also redraws the held-out users), and judged on
users it never saw: the real hit rate of its picks (held-out movies the user rated >= 4) next to
random and popularity-first, the mean real rating of picks that have one, and gap closed against
the simulator oracle. Means come with 95% t-intervals over seeds.

    python bench/policy_eval.py --data-dir ../shared/datasets [--reward-checkpoint runs/qs/reward/checkpoint]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mean_ci(xs: list[float]) -> dict:
    import numpy as np
    from scipy import stats

    a = np.asarray(xs, float)
    half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
    return {"mean": float(a.mean()), "ci95": [float(a.mean() - half), float(a.mean() + half)], "per_seed": a.tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", "../shared/datasets"))
    ap.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", "~/.cache/rlsim"))
    ap.add_argument("--reward-checkpoint", help="reward model checkpoint (default: train one, ~2 min)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--work", help="folder for the runs (default: a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "policy_eval.json"))
    args = ap.parse_args(argv)

    from rlsim.candidates import CandidatesConfig, write_candidates
    from rlsim.commands.ray_session import ray_session
    from rlsim.config import DataConfig
    from rlsim.data import load_split
    from rlsim.io import write_json
    from rlsim.policy.config import PolicyConfig
    from rlsim.policy.run import evaluate_policy, train_policy
    from rlsim.simulators.factory import SimulatorSpec

    work = Path(args.work or tempfile.mkdtemp(prefix="rlsim-bench-policy-"))
    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=args.data_dir, cache_dir=args.cache_dir, download=False)
    ds, split = load_split(dcfg)
    ckpt = args.reward_checkpoint
    if not ckpt:
        from rlsim.reward.config import RewardConfig
        from rlsim.reward.train import train_reward_model

        train_reward_model(dcfg, RewardConfig(), work / "reward", dataset=ds, split=split)
        ckpt = str(work / "reward" / "checkpoint")
    cand = write_candidates(dcfg, CandidatesConfig(), work / "candidates", dataset=ds, split=split)
    import pandas as pd

    cands = pd.read_parquet(work / "candidates" / "candidates.parquet")
    runs = []
    t0 = time.perf_counter()
    with ray_session(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rlsim-ray-", dir="/tmp")):
        for seed in range(args.seeds):
            pcfg = PolicyConfig(iterations=args.iterations, seed=seed)
            run = work / f"policy-seed{seed}"
            train_policy(dcfg, pcfg, SimulatorSpec("reward_model", ckpt), run, candidates=cands, dataset=ds, split=split,
                         progress=False)
            m = evaluate_policy(dcfg, run, work / f"eval-seed{seed}", dataset=ds, split=split)
            runs.append(m)
            print(seed, json.dumps({"real_hit_rate": m["real_hit_rate"], "gap_closed": m["gap_closed"]}), flush=True)
    names = ("policy", "random", "popularity", "greedy", "simulator_oracle", "real_oracle")
    result = {
        "dataset": "ml-100k u1", "simulator": "reward_model (sampled ratings)", "seeds": args.seeds,
        "iterations": args.iterations, "held_out_users": runs[0]["held_out_users"],
        "candidates_recall@25": cand["candidates"]["blend"]["recall"],
        "real_hit_rate": {n: mean_ci([r["real_hit_rate"][n] for r in runs]) for n in names},
        "mean_real_rating": {n: mean_ci([r[n]["mean_real_rating"] for r in runs]) for n in names},
        "real_coverage": {n: mean_ci([r[n]["real_coverage"] for r in runs]) for n in names},
        "gap_closed_held_out": mean_ci([r["gap_closed"] for r in runs]),
        "gap_closed_training_users": mean_ci([r["train_users"]["gap_closed"] for r in runs]),
        "policy_minus_popularity_hit_rate": mean_ci([r["real_hit_rate"]["policy"] - r["real_hit_rate"]["popularity"]
                                                     for r in runs]),
        "ranking_ndcg": {n: mean_ci([r["ndcg"][n] for r in runs]) for n in ("policy", "popularity", "floor")},
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python bench/policy_eval.py --data-dir ../shared/datasets",
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
