"""Hybrid reward with active distillation on ML-100K u1 -> bench/results/hybrid.json.

The reward model answers; the persona (here the offline persona, the free stand-in for an LLM
pool) is asked only where the reward model's normalised entropy is above a threshold, its answers
cached and distilled back into the reward model. For each threshold PPO is trained against the
hybrid (same env steps, several seeds) and judged on held-out users by real held-out ratings;
threshold 0 is persona-only (every answer from the persona, through the same cache), so

    calls_saved = 1 - persona_calls(threshold) / persona_calls(0)

Fidelity (NLL, RMSE of the judging copy, which never distils) is measured on the test split.
The goal (issue #10): >= 80% fewer persona calls at <= 0.01 loss in real held-out hit rate.

    python bench/hybrid.py --data-dir ../shared/datasets --reward-checkpoint runs/qs/reward/checkpoint
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", "../shared/datasets"))
    ap.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", "~/.cache/rlsim"))
    ap.add_argument("--reward-checkpoint", required=True)
    ap.add_argument("--thresholds", default="0,0.8,0.85,0.9,0.95,1.01")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--env-steps", type=int, default=30000)
    ap.add_argument("--distill-every", type=int, default=2000)
    ap.add_argument("--max-persona-calls", type=int, help="hard budget of persona answers per policy")
    ap.add_argument("--work", help="folder for the runs (default: a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hybrid.json"))
    args = ap.parse_args(argv)

    import numpy as np
    import pandas as pd

    from rlsim.candidates import CandidatesConfig, write_candidates
    from rlsim.commands.ray_session import ray_session
    from rlsim.config import DataConfig
    from rlsim.data import load_split
    from rlsim.env import EnvData, score_all
    from rlsim.io import write_json
    from rlsim.policy.config import PolicyConfig
    from rlsim.policy.run import split_users, train_policy
    from rlsim.policy.train import load_policy_module
    from rlsim.simulators.factory import SimulatorSpec, local_simulator
    from rlsim.simulators.fidelity import micro
    from rlsim.study import judge_policy, mean_ci

    work = Path(args.work or tempfile.mkdtemp(prefix="rlsim-bench-hybrid-"))
    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=args.data_dir, cache_dir=args.cache_dir, download=False)
    ds, split = load_split(dcfg)
    write_candidates(dcfg, CandidatesConfig(), work / "candidates", dataset=ds, split=split)
    cands = pd.read_parquet(work / "candidates" / "candidates.parquet")
    base = PolicyConfig()
    base.iterations = max(1, math.ceil(args.env_steps / base.train_batch_size))
    thresholds = [float(t) for t in args.thresholds.split(",")]
    model_table = None
    curve = []
    t0 = time.perf_counter()
    with ray_session(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rlsim-ray-", dir="/tmp")):
        for th in thresholds:
            opts = {"threshold": th, "distill_every": args.distill_every, "max_persona_calls": args.max_persona_calls}
            judge = local_simulator(SimulatorSpec("hybrid", args.reward_checkpoint, options={**opts, "distill_every": 0}),
                                    ds, split.train)
            fid = micro(judge, split.test)
            hits, calls, requested, steps = [], [], [], []
            for seed in range(args.seeds):
                run = work / f"t{th:g}-seed{seed}"
                pcfg = PolicyConfig(**{**vars(base), "seed": seed})
                tm = train_policy(dcfg, pcfg, SimulatorSpec("hybrid", args.reward_checkpoint, options=opts), run,
                                  candidates=cands, dataset=ds, split=split, progress=False)
                data = EnvData.load(run / "env_data")
                if model_table is None:
                    model_table = score_all(data, local_simulator(SimulatorSpec("model", args.reward_checkpoint), ds,
                                                                 split.train))
                _, held = split_users(len(data.user_ids), pcfg.holdout_users, seed)
                res = judge_policy(data, held, load_policy_module(run / "checkpoint"), pcfg.env_history(),
                                   {}, model_table, split.test, 4.0, 10)
                sim = tm["simulator"]["simulator"]
                hits.append(res["real"]["policy"]["hit_rate"])
                calls.append(sim["persona_calls"])
                requested.append(sim["requested"])
                steps.append(tm["env_steps"])
                print(f"threshold {th:g} seed {seed}: hit {hits[-1]:.4f} persona calls {calls[-1]} of "
                      f"{requested[-1]} pairs, distillations {sim['distillations']}", flush=True)
            curve.append({"threshold": th, "persona_calls": float(np.mean(calls)), "requested": float(np.mean(requested)),
                          "real_hit_rate": mean_ci(hits)["mean"], "real_hit_rate_ci": mean_ci(hits),
                          "real_hit_rate_per_seed": hits, "env_steps": float(np.mean(steps)),
                          "nll": fid["nll"], "rmse": fid["rmse"]})
    persona_only = next((c for c in curve if c["threshold"] == 0), None)
    for c in curve:
        c["calls_saved"] = None if not persona_only or not persona_only["persona_calls"] else \
            1 - c["persona_calls"] / persona_only["persona_calls"]
        c["hit_rate_loss_vs_persona_only"] = None if not persona_only else \
            persona_only["real_hit_rate"] - c["real_hit_rate"]
    ok = [c for c in curve if c["calls_saved"] is not None and c["calls_saved"] >= 0.8
          and c["hit_rate_loss_vs_persona_only"] <= 0.01]
    result = {"dataset": "ml-100k u1", "persona": "offline persona (not an LLM)", "seeds": args.seeds,
              "env_steps_per_policy": args.env_steps, "distill_every": args.distill_every,
              "max_persona_calls": args.max_persona_calls, "curve": curve,
              "goal": ">= 80% fewer persona calls than persona-only at <= 0.01 loss in real held-out hit rate",
              "meets_goal_at": [c["threshold"] for c in ok], "seconds": round(time.perf_counter() - t0, 1),
              "command": "python bench/hybrid.py --data-dir ../shared/datasets --reward-checkpoint CKPT"}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
