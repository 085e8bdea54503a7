"""The sim-to-real study as a benchmark -> bench/results/study.json.

For each dataset/split, `rlsim.study.run_study` trains a PPO policy per source and seed (held-out
users drawn only among users with held-out ratings), judges every policy and every reference
(popularity-first, random, real oracle, explicit MF top-1, BPR top-1, reward-model greedy) on the
same held-out users and candidates, and reports each source's paired difference from
popularity-first with a two-level bootstrap interval (seeds, then users), Holm-corrected across all
sources. Every key of the output is written here, with the command line and the wall time.

    python bench/study.py --data-dir ../shared/datasets --reward-checkpoint runs/qs2/reward/checkpoint
(ML-100K u1, 5 sources x 5 seeds x 30000 env steps: an estimated 40 minutes on 2 cores, not measured yet.)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
# What bench/results/study.json keeps of each study.json (the rest stays in the study folder).
KEEP = ("held_out_users", "held_out_users_with_behaviour", "held_out", "seeds", "env_steps_per_policy",
        "like_threshold", "ndcg_k", "sources", "references", "fidelity_vs_real_spearman", "hybrid_vs_ends",
        "fidelity", "choice_reference", "metric_denominators", "bootstrap", "reference_settings", "candidates_recall",
        "answer", "notes", "seconds", "timing")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", "../shared/datasets"))
    ap.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", "~/.cache/rlsim"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "study.yaml"), help="the study's YAML sections")
    ap.add_argument("--datasets", default="ml-100k/u1", help="comma-separated DATASET/SPLIT")
    ap.add_argument("--sources", help="comma-separated sources (default: the config's)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--env-steps", type=int, help="env steps per policy (default: the config's)")
    ap.add_argument("--bootstrap", type=int, help="bootstrap replicates (default: the config's)")
    ap.add_argument("--reward-checkpoint", help="an existing reward model (default: the study trains one)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--work", help="folder for the study runs (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "study.json"))
    ap.add_argument("--fresh", action="store_true", help="drop the datasets an earlier run left in --out")
    args = ap.parse_args(argv)

    from dataclasses import replace

    from rlsim.commands.ray_session import ray_session
    from rlsim.config import to_dict
    from rlsim.errors import ConfigError
    from rlsim.io import read_json, write_json
    from rlsim.run_config import resolve
    from rlsim.study import run_study

    t0 = time.perf_counter()
    # The YAML alone (no environment): --data-dir / --cache-dir and the dataset/split pairs are set below.
    base = resolve(args.config, {}, {"data_dir": args.data_dir, "cache_dir": args.cache_dir})
    pairs = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in pairs if d.count("/") != 1]
    if bad or not pairs:
        ap.error(f"--datasets: expected DATASET/SPLIT items, got {bad or args.datasets!r}")
    scfg = replace(base.study, seeds=args.seeds, **{k: v for k, v in (("env_steps", args.env_steps),
                                                                   ("bootstrap", args.bootstrap),
                                                                   ("reward_checkpoint", args.reward_checkpoint))
                                              if v is not None})
    if args.sources:
        scfg.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    try:
        scfg.validate()
    except ConfigError as exc:
        ap.error(str(exc))
    work = Path(args.work or tempfile.mkdtemp(prefix="rlsim-bench-study-"))
    command = "python bench/study.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    # Datasets run by earlier commands stay (each entry names its own command and wall time); the
    # file is written after every dataset, so a long run keeps what it finished.
    out = Path(args.out)
    result = {"datasets": read_json(out).get("datasets", {}) if out.is_file() and not args.fresh else {}}
    datasets = result["datasets"]
    result.update({"config": {"study": to_dict(scfg), "file": args.config}, "work": str(work), "command": command,
                   "cpus": args.num_cpus})
    with ray_session(num_cpus=args.num_cpus, include_dashboard=False,
                     _temp_dir=tempfile.mkdtemp(prefix="rlsim-ray-", dir="/tmp")):
        for pair in pairs:
            t1 = time.perf_counter()
            dataset, split = pair.split("/")
            run = replace(base, data=replace(base.data, dataset=dataset, split=split),
                          study=replace(scfg, sources=list(scfg.sources)))
            r = run_study(run, work / f"{dataset}-{split}", progress=False)
            datasets[pair] = {**{k: r[k] for k in KEEP if k in r}, "command": command, "config_file": args.config,
                              "policy": to_dict(run.policy), "reward": to_dict(run.reward),
                              "wall_seconds": round(time.perf_counter() - t1, 1), "cpus": args.num_cpus}
            result["wall_seconds"] = round(time.perf_counter() - t0, 1)
            # Another run may have written other datasets meanwhile: keep theirs, replace ours.
            if out.is_file() and not args.fresh:
                datasets.update({k: v for k, v in read_json(out).get("datasets", {}).items()
                                 if k not in pairs or k not in datasets})
            write_json(out, result)
            print(f"{pair}: {r['answer']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
