"""`rlsim policy train|evaluate`: flags in, rlsim.policy.run out.

train writes OUT/{env_data/, checkpoint/, train_metrics.json, run.json}; evaluate reads that run
folder and writes OUT/{metrics.json, per_user.parquet, reward_boxplot.png}. Ray is started (or
joined with --ray-address) here, at the edge.

--reward llm_persona (LLM personas as the simulated user, rlsim.simulators.llm): the endpoint and
key are resolved here as `rlsim personas` resolves them (OPENAI_BASE_URL / OPENAI_API_KEY, or
AZURE_OPENAI_ENDPOINT / AZURE_OPENAI_API_KEY; the `personas:` section; flags win) and handed to the
library; the key is never logged, cached or written.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rlsim.cli import add_data_args, add_quiet_arg, add_ray_arg, run_config
from rlsim.commands.ray_session import cli_ray, quiet_ray
from rlsim.config import load_yaml
from rlsim.errors import ConfigError, DataError
from rlsim.run_config import api_key, personas_for
from rlsim.simulators import registry
from rlsim.simulators.factory import SimulatorSpec


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
    t.add_argument("--reward-signal", dest="policy_reward", choices=["rating", "engagement", "liked"],
                   help="what the policy is paid for (policy.reward): rating (default; every pick rated as if "
                        "watched), engagement (the user first chooses; a skip earns -skip_penalty), liked (1 when "
                        "watched and rated >= like_threshold); engagement and liked need a user who chooses")
    t.add_argument("--skip-penalty", type=float, help="what a skipped pick costs under engagement (0)")
    t.add_argument("--exit-after-skips", type=int, help="users leave after this many skips in a row")
    t.add_argument("--reward-mode", choices=["sampled", "expected", "static"],
                   help="sampled (default): each rating drawn from the simulator given the session so far; "
                        "expected: its expectation; static: one no-session table (fast, horizon 1)")
    t.add_argument("--holdout-users", type=float, help="share of users never trained on, for evaluation (0.2)")
    t.add_argument("--num-env-runners", type=int, help="remote env runners (0 = sample in the driver)")
    t.add_argument("--num-envs", type=int, help="sessions stepped together per env runner")
    t.add_argument("--num-gpus-per-learner", type=float, help="GPUs for the PPO learner (0 = CPU)")
    t.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    llm_args(t)
    add_ray_arg(t)
    add_quiet_arg(t)
    t.set_defaults(func=cmd_train)

    e = s.add_parser("evaluate", help="held-out users: real hit rate, NDCG, and the simulator's view")
    add_data_args(e)
    e.add_argument("--run", required=True, help="the `rlsim policy train` run folder")
    e.add_argument("--out", required=True, help="output folder (metrics.json, per_user.parquet, PNG)")
    _reward_args(e, required=False)
    # Not candidates.like_threshold (`candidates build --like-threshold`): this one only judges.
    e.add_argument("--like-threshold", dest="hit_threshold", type=float, default=4.0,
                   help="held-out rating counted as a hit")
    e.add_argument("--ndcg-k", type=int, default=10, help="cut-off of the candidate-ranking NDCG")
    llm_args(e)
    add_ray_arg(e)
    e.set_defaults(func=cmd_evaluate)


# --reward llm_persona: (flag, dest, type, help). The endpoint flags are those of `rlsim personas`
# (read by rlsim.commands.personas.persona_config); the last two fill the `llm_persona:` section.
LLM_FLAGS = [
    ("--model", "model", str, "chat model (Azure: the deployment name)"),
    ("--base-url", "base_url", str, "OpenAI-compatible endpoint (default $OPENAI_BASE_URL)"),
    ("--api-version", "api_version", str, "Azure OpenAI api-version"),
    ("--rpm", "rpm", float, "requests per minute, shared by every job on the cluster and endpoint"),
    ("--tpm", "tpm", float, "tokens per minute, shared by every job on the cluster and endpoint"),
    ("--budget-usd", "budget_usd", float, "hard cap on the persona's spend; pairs it leaves unrated fail "
                                          "with reason 'budget' (the env uses the user's mean)"),
    ("--timeout", "timeout", float, "seconds per request"),
    ("--max-retries", "max_retries", int, "retries of a failed or unusable answer"),
    ("--concurrency", "concurrency", int, "requests in flight"),
    ("--batch-size", "batch_size", int, "movies per prompt (pairs of one user and session)"),
    ("--llm-method", "llm_method", str, "auto (default) | logprobs | samples | noise: how the distribution "
                                        "is obtained"),
    ("--summary-every", "summary_every", int, "update the persona's summary every N ratings of a session "
                                              "(0 = never)"),
]


def llm_args(p) -> None:
    g = p.add_argument_group("LLM persona (--reward llm_persona; endpoint and key as `rlsim personas`: "
                             "OPENAI_BASE_URL, OPENAI_API_KEY or Azure's)")
    for flag, dest, typ, hlp in LLM_FLAGS:
        g.add_argument(flag, dest=dest, type=typ, help=hlp)
    g.add_argument("--no-cache", dest="no_cache", action="store_true",
                   help="do not read or write the persona response cache")


def llm_persona_edge(run):
    """(PersonaConfig, API key) for an LLM persona simulator: the `personas:` section, the environment
    and the flags as `rlsim personas` resolves them; an LLM persona is an LLM, so the backend is
    openai unless the section names another LLM backend."""
    cfg = personas_for(run, "llm")
    return cfg, api_key(cfg, os.environ)


def _simulator_name(value: str) -> str:
    """--reward takes a simulator's one name (rlsim.simulators.registry); old names are accepted."""
    try:
        return registry.canonical(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _reward_args(p, required: bool = True) -> None:
    about = "; ".join(f"{e.name} ({e.about}" + (f"; needs {', '.join(e.needs)})" if e.needs else ")")
                      for e in registry.REGISTRY.values())
    p.add_argument("--reward", type=_simulator_name, metavar="|".join(registry.names()),
                   default="mf" if required else None,
                   help=f"the simulated user: {about}; evaluate defaults to the training run's")
    p.add_argument("--reward-checkpoint", help="reward model checkpoint folder (reward_model, hybrid)")
    p.add_argument("--reward-actor", help="name of a running simulator actor (--reward actor)")
    p.add_argument("--reward-namespace", help="Ray namespace of --reward-actor")


def reward_spec(args, run) -> SimulatorSpec | None:
    """The simulator named by --reward; a hybrid takes its settings from the YAML's `hybrid:` section, an
    LLM persona from `llm_persona:` (then --llm-method, --summary-every)."""
    if not getattr(args, "reward", None):
        return None
    options = dict(run.hybrid) if args.reward == "hybrid" else {}
    if args.reward == "llm_persona":
        options = dict(run.llm_persona)
        from rlsim.simulators.llm_config import llm_sim_config

        llm_sim_config(options)  # a bad llm_persona: section is one line here, not an actor's traceback
    return SimulatorSpec(args.reward, args.reward_checkpoint, args.reward_actor, args.reward_namespace,
                         options=options).validate()


def load_candidates(path: str):
    import pandas as pd

    p = Path(path)
    p = p / "candidates.parquet" if p.is_dir() else p
    if not p.is_file():
        raise DataError(f"candidates not found: {p}")
    return pd.read_parquet(p)


def cmd_train(args) -> int:
    from rlsim.policy.run import train_policy

    run = run_config(args)
    pcfg = run.policy.validate()
    spec = reward_spec(args, run)
    cands = load_candidates(args.candidates) if args.candidates else None
    out = Path(args.out)
    persona_cfg, key = llm_persona_edge(run) if spec.kind == "llm_persona" else (run.personas, None)
    with cli_ray(args, args.num_cpus):
        metrics = train_policy(run.data, pcfg, spec, out, candidates=cands, ccfg=run.candidates,
                               progress=not args.quiet, persona_cfg=persona_cfg, api_key=key)
    last = metrics["iterations"][-1]
    print(json.dumps({"iterations": len(metrics["iterations"]), "reward_per_step": last["reward_per_step"],
                      "env_steps_per_s": metrics["env_steps_per_s"], **metrics["users"]}))
    print(f"wrote {out / 'checkpoint'}")
    return 0


def cmd_evaluate(args) -> int:
    from rlsim.policy.run import evaluate_policy, load_run

    meta = load_run(args.run)
    sections = load_yaml(args.config) if args.config else {}
    if "data" not in sections:  # the training run's data, unless --config names one
        sections = {**sections, "data": meta["data"]}
    run = run_config(args, sections)
    spec = reward_spec(args, run)
    kind = (spec.kind if spec else meta["reward"]["kind"])
    # Only a running simulator actor needs Ray; every other simulator is built in this process.
    import contextlib

    quiet_ray(args.verbose, rllib=True)  # loading the policy imports RLlib, which has notices of its own
    persona_cfg, key = llm_persona_edge(run) if kind == "llm_persona" else (run.personas, None)
    with cli_ray(args) if kind == "actor" else contextlib.nullcontext():
        m = evaluate_policy(run.data, args.run, args.out, spec=spec, like_threshold=args.hit_threshold,
                            ndcg_k=args.ndcg_k, persona_cfg=persona_cfg, api_key=key)
    show = {"held_out_users": m["held_out_users"],
            "real_hit_rate": {k: round(float(v), 4) for k, v in m["real_hit_rate"].items()},
            "gap_closed_vs_simulator_oracle": round(float(m["gap_closed"]), 4)}
    print(json.dumps(show))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0
