"""`rlsim policy train|evaluate`: flags in, rlsim.policy.run out.

train writes OUT/{env_data/, checkpoint/, train_metrics.json, run.json}; evaluate reads that run
folder and writes OUT/{metrics.json, per_user.parquet, reward_boxplot.png}. Ray is started (or
joined with --ray-address) here, at the edge.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlsim.cli import add_data_args, add_quiet_arg, add_ray_arg, apply_flags, data_config, load_config_file
from rlsim.commands.ray_session import cli_ray, quiet_ray
from rlsim.config import from_dict
from rlsim.errors import DataError
from rlsim.policy.config import PolicyConfig
from rlsim.simulators.factory import KINDS, SimulatorSpec


def register(sub) -> None:
    p = sub.add_parser("policy", help="PPO policy over RankZero candidates")
    s = p.add_subparsers(dest="policy_command", required=True)

    t = s.add_parser("train", help="train PPO (RLlib new API stack) against a simulated user")
    add_data_args(t)
    t.add_argument("--out", required=True, help="run folder")
    _reward_args(t)
    t.add_argument("--candidates", help="candidates.parquet or a `rlsim candidates build` folder "
                                        "(default: build them now with the candidates: config)")
    t.add_argument("--iterations", type=int, help="PPO iterations (default 15)")
    t.add_argument("--horizon", type=int, help="picks per session (1 = the paper's one-shot setting)")
    t.add_argument("--reward-mode", choices=["sampled", "expected", "static"],
                   help="sampled (default): each rating drawn from the simulator given the session so far; "
                        "expected: its expectation; static: one no-session table (fast, horizon 1)")
    t.add_argument("--holdout-users", type=float, help="share of users never trained on, for evaluation (0.2)")
    t.add_argument("--num-env-runners", type=int, help="remote env runners (0 = sample in the driver)")
    t.add_argument("--num-envs", type=int, help="sessions stepped together per env runner")
    t.add_argument("--num-gpus-per-learner", type=float, help="GPUs for the PPO learner (0 = CPU)")
    t.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    add_ray_arg(t)
    add_quiet_arg(t)
    t.set_defaults(func=cmd_train)

    e = s.add_parser("evaluate", help="held-out users: real hit rate, NDCG, and the simulator's view")
    add_data_args(e)
    e.add_argument("--run", required=True, help="the `rlsim policy train` run folder")
    e.add_argument("--out", required=True, help="output folder (metrics.json, per_user.parquet, PNG)")
    _reward_args(e, required=False)
    e.add_argument("--like-threshold", type=float, default=4.0, help="held-out rating counted as a hit")
    e.add_argument("--ndcg-k", type=int, default=10, help="cut-off of the candidate-ranking NDCG")
    add_ray_arg(e)
    e.set_defaults(func=cmd_evaluate)


def _reward_args(p, required: bool = True) -> None:
    p.add_argument("--reward", choices=KINDS, default="mf" if required else None,
                   help="simulated user: bias | mf (baselines + calibrated noise), model (--reward-checkpoint), "
                        "personas (the offline persona, personas: config), hybrid (model + persona where unsure, "
                        "hybrid: config), actor (a running simulator actor); "
                        "evaluate defaults to the training run's")
    p.add_argument("--reward-checkpoint", help="reward model checkpoint folder (for --reward model)")
    p.add_argument("--reward-actor", help="name of a running simulator actor (--reward actor)")
    p.add_argument("--reward-namespace", help="Ray namespace of --reward-actor")


def reward_spec(args, file_cfg: dict | None = None) -> SimulatorSpec | None:
    """The simulator named by --reward; a hybrid takes its settings from the YAML's `hybrid:` section."""
    if not getattr(args, "reward", None):
        return None
    options = dict((file_cfg or {}).get("hybrid") or {}) if args.reward == "hybrid" else {}
    return SimulatorSpec(args.reward, args.reward_checkpoint, args.reward_actor, args.reward_namespace,
                         options=options).validate()


def policy_config(args, file_cfg: dict) -> PolicyConfig:
    cfg = from_dict(PolicyConfig, file_cfg.get("policy"), "policy")
    apply_flags(cfg, args, [("iterations", "iterations"), ("horizon", "horizon"), ("reward_mode", "reward_mode"),
                            ("holdout_users", "holdout_users"), ("num_env_runners", "num_env_runners"),
                            ("num_envs", "num_envs_per_env_runner"), ("num_gpus_per_learner", "num_gpus_per_learner"),
                            ("seed", "seed")])
    return cfg.validate()


def load_candidates(path: str):
    import pandas as pd

    p = Path(path)
    p = p / "candidates.parquet" if p.is_dir() else p
    if not p.is_file():
        raise DataError(f"candidates not found: {p}")
    return pd.read_parquet(p)


def cmd_train(args) -> int:
    from rlsim.candidates import CandidatesConfig
    from rlsim.policy.run import train_policy

    file_cfg = load_config_file(args)
    dcfg = data_config(args, file_cfg)
    pcfg = policy_config(args, file_cfg)
    spec = reward_spec(args, file_cfg)
    cands = load_candidates(args.candidates) if args.candidates else None
    ccfg = from_dict(CandidatesConfig, file_cfg.get("candidates"), "candidates")
    out = Path(args.out)
    with cli_ray(args, args.num_cpus):
        metrics = train_policy(dcfg, pcfg, spec, out, candidates=cands, ccfg=ccfg, sections=file_cfg,
                               progress=not args.quiet)
    last = metrics["iterations"][-1]
    print(json.dumps({"iterations": len(metrics["iterations"]), "reward_per_step": last["reward_per_step"],
                      "env_steps_per_s": metrics["env_steps_per_s"], **metrics["users"]}))
    print(f"wrote {out / 'checkpoint'}")
    return 0


def cmd_evaluate(args) -> int:
    from rlsim.policy.run import evaluate_policy, load_run

    meta = load_run(args.run)
    file_cfg = load_config_file(args)
    if "data" not in file_cfg:
        file_cfg = {**file_cfg, "data": meta["data"]}
    dcfg = data_config(args, file_cfg)
    spec = reward_spec(args, file_cfg)
    kind = (spec.kind if spec else meta["reward"]["kind"])
    # Only a running simulator actor needs Ray; every other simulator is built in this process.
    import contextlib

    quiet_ray(args.verbose, rllib=True)  # loading the policy imports RLlib, which has notices of its own
    with cli_ray(args) if kind == "actor" else contextlib.nullcontext():
        m = evaluate_policy(dcfg, args.run, args.out, spec=spec, like_threshold=args.like_threshold,
                            ndcg_k=args.ndcg_k, sections=file_cfg)
    show = {"held_out_users": m["held_out_users"],
            "real_hit_rate": {k: round(float(v), 4) for k, v in m["real_hit_rate"].items()},
            "gap_closed_vs_simulator_oracle": round(float(m["gap_closed"]), 4)}
    print(json.dumps(show))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0
