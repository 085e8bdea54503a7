"""The hybrid's curve: persona calls saved against real held-out quality, over its entropy threshold.

Part of the sim-to-real study (rlsim.study runs it when study.hybrid_thresholds is set; bench/hybrid.py
runs it alone). Ray must be running: each policy's simulator lives in a named actor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rlsim.study_steps import candidates_stage, held_out_rows, judge_policy, mean_ci, policy_base

if TYPE_CHECKING:
    from rlsim.run_config import RunConfig

log = logging.getLogger(__name__)


def hybrid_curve(run: "RunConfig", ckpt: str, out: str | Path, dataset=None, split=None,
                 progress: bool = True) -> dict:
    """Persona calls saved against real quality, over the hybrid's entropy threshold
    (run.study: hybrid_thresholds, seeds, env_steps, hybrid, like_threshold, bootstrap).

    For each threshold PPO is trained against the hybrid (same env steps, ``seeds`` seeds) and judged
    on held-out users by their real held-out ratings; threshold 0 is persona-only (every answer from
    the persona, through the same cache), so calls_saved = 1 - calls(threshold) / calls(0); a
    threshold >= 1 never asks the persona (reward-model-only). A middle threshold counts as better
    only when it beats both ends with paired intervals (``beats_both_ends``). The fidelity columns
    are the judging copy's (it never distils) on the test split."""
    from tqdm.auto import tqdm

    from rlsim.data import load_split
    from rlsim.env import EnvData, score_all
    from rlsim.errors import require_ray
    from rlsim.policy.run import train_policy
    from rlsim.policy.train import load_policy_module
    from rlsim.simulators.factory import SimulatorSpec, local_simulator
    from rlsim.simulators.fidelity import micro

    require_ray("the hybrid curve")
    dcfg, scfg = run.data, run.study
    thresholds, seeds, env_steps, hybrid = scfg.hybrid_thresholds, scfg.seeds, scfg.env_steps, scfg.hybrid
    out = Path(out)
    if dataset is None:
        dataset, split = load_split(dcfg)
    _, cands = candidates_stage(run, out, (dataset, split))
    base = policy_base(run)
    model_table, curve, per_user, t0 = None, [], {}, time.perf_counter()
    bar = tqdm(total=len(thresholds) * seeds, desc="hybrid curve", unit="policy", disable=not progress)
    for th in [float(t) for t in thresholds]:
        opts = {**hybrid, "threshold": th}
        fid = micro(local_simulator(SimulatorSpec("hybrid", ckpt, options={**opts, "distill_every": 0}), dataset,
                                    split.train), split.test)
        hits, calls, requested, steps = [], [], [], []
        for seed in range(seeds):
            run_dir = out / f"t{th:g}-seed{seed}"
            pcfg = replace(base, seed=seed)
            tm = train_policy(dcfg, pcfg, SimulatorSpec("hybrid", ckpt, options=opts), run_dir, candidates=cands,
                              ccfg=run.candidates, persona_cfg=run.personas, dataset=dataset, split=split,
                              progress=False)
            data = EnvData.load(run_dir / "env_data")
            if model_table is None:  # only its mask matters here: every candidate the reward model rates
                model_table = score_all(data, local_simulator(SimulatorSpec("model", ckpt), dataset, split.train))
            held = held_out_rows(data, run_dir)
            res = judge_policy(data, held, load_policy_module(run_dir / "checkpoint"), pcfg.env_history(), {},
                               model_table, split.test, scfg.like_threshold, 10)
            per_user.setdefault(th, []).append(res["outcomes"]["hit"])
            sim = tm["simulator"]["simulator"]
            hits.append(res["real"]["policy"]["hit_rate"])
            calls.append(sim["persona_calls"])
            requested.append(sim["requested"])
            steps.append(tm["env_steps"])
            log.info("threshold %g seed %d: hit %.4f, persona calls %d of %d", th, seed, hits[-1], calls[-1],
                     requested[-1])
            bar.update(1)
        h = mean_ci(hits)
        curve.append({"threshold": th, "persona_calls": float(np.mean(calls)), "requested": float(np.mean(requested)),
                      "real_hit_rate": h["mean"], "real_hit_rate_ci": h, "real_hit_rate_per_seed": hits,
                      "env_steps": float(np.mean(steps)), "nll": fid["nll"], "rmse": fid["rmse"]})
    bar.close()
    persona_only = next((c for c in curve if c["threshold"] == 0), None)
    for c in curve:
        c["calls_saved"] = None if not persona_only or not persona_only["persona_calls"] else \
            1 - c["persona_calls"] / persona_only["persona_calls"]
        c["hit_rate_loss_vs_persona_only"] = None if not persona_only else \
            persona_only["real_hit_rate"] - c["real_hit_rate"]
    from rlsim.study_real import curve_ends, curve_vs_ends

    ends = curve_ends(curve)
    # The goal is only meaningful strictly between the ends: threshold >= 1 never asks the persona.
    ok = [c["threshold"] for c in curve if c["calls_saved"] is not None and c["calls_saved"] >= 0.8
          and c["hit_rate_loss_vs_persona_only"] <= 0.01 and c["threshold"] not in ends]
    verdicts = curve_vs_ends(per_user, ends, scfg.bootstrap, dcfg.seed)
    for c in curve:
        c["beats_both_ends"] = verdicts.get(c["threshold"])
    return {"dataset": f"{dcfg.dataset} {split.name}", "seeds": seeds, "env_steps_per_policy": env_steps,
            "hybrid": dict(hybrid), "curve": curve, "meets_goal_at": ok,
            "goal": ">= 80% fewer persona calls than persona-only at <= 0.01 loss in real held-out hit rate "
                    "(thresholds strictly between persona-only and reward-model-only)",
            "ends": {"persona_only": ends[0] if ends else None, "reward_model_only": ends[1] if ends else None},
            "better_than_both_ends_at": [t for t, v in verdicts.items() if v and v.get("better")],
            "seconds": round(time.perf_counter() - t0, 1)}
