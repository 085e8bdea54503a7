"""Hybrid reward with active distillation on ML-100K u1 -> bench/results/hybrid.json.

The reward model answers; the persona (here the offline persona, the free stand-in for an LLM
pool) is asked only where the reward model's normalised entropy is above a threshold, its answers
cached and distilled back into the reward model. rlsim.study.hybrid_curve trains PPO against the
hybrid for each threshold (same env steps, several seeds) and judges it on held-out users by real
held-out ratings; threshold 0 is persona-only (same cache), so

    calls_saved = 1 - persona_calls(threshold) / persona_calls(0)

The goal (issue #10): >= 80% fewer persona calls at <= 0.01 loss in real held-out hit rate.
`rlsim study` traces the same curve when `study.hybrid_thresholds` is set.

    python bench/hybrid.py --data-dir ../shared/datasets --reward-checkpoint runs/qs/reward/checkpoint
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
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

    from rlsim.commands.ray_session import ray_session
    from rlsim.config import DataConfig
    from rlsim.io import write_json
    from rlsim.run_config import RunConfig
    from rlsim.study import StudyConfig
    from rlsim.study_hybrid import hybrid_curve

    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=args.data_dir, cache_dir=args.cache_dir, download=False)
    hybrid = {"distill_every": args.distill_every, "max_persona_calls": args.max_persona_calls}
    run = RunConfig(data=dcfg, study=StudyConfig(hybrid_thresholds=[float(t) for t in args.thresholds.split(",")],
                                                 seeds=args.seeds, env_steps=args.env_steps, hybrid=hybrid))
    work = Path(args.work or tempfile.mkdtemp(prefix="rlsim-bench-hybrid-"))
    with ray_session(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rlsim-ray-", dir="/tmp")):
        result = hybrid_curve(run, args.reward_checkpoint, work)
    result.update({"persona": "offline persona (not an LLM)",
                   "command": "python bench/hybrid.py --data-dir ../shared/datasets --reward-checkpoint CKPT"})
    write_json(args.out, result)
    for c in result["curve"]:
        print(f"threshold {c['threshold']:g}: calls saved {c['calls_saved']:.3f}, real hit rate "
              f"{c['real_hit_rate']:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
