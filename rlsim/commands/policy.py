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
from pathlib import Path

from rlsim.cli import add_data_args, add_quiet_arg, add_ray_arg, apply_flags, data_config, load_config_file
from rlsim.commands.ray_session import cli_ray, quiet_ray
from rlsim.config import from_dict
from rlsim.errors import ConfigError, DataError
from rlsim.policy.config import PolicyConfig
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
    _llm_args(t)
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
    _llm_args(e)
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


def _llm_args(p) -> None:
    g = p.add_argument_group("LLM persona (--reward llm_persona; endpoint and key as `rlsim personas`: "
                             "OPENAI_BASE_URL, OPENAI_API_KEY or Azure's)")
    for flag, dest, typ, hlp in LLM_FLAGS:
        g.add_argument(flag, dest=dest, type=typ, help=hlp)
    g.add_argument("--no-cache", dest="no_cache", action="store_true",
                   help="do not read or write the persona response cache")


def llm_persona_edge(args, file_cfg: dict):
    """(PersonaConfig, API key) for --reward llm_persona: the `personas:` section, the environment and the
    flags (flags win), as `rlsim personas` resolves them; an LLM persona is an LLM, so the backend is
    openai unless the section names another LLM backend."""
    from rlsim.commands.personas import api_key, persona_config

    section = dict(file_cfg.get("personas") or {})
    if section.get("backend") in (None, "auto", "offline"):
        section["backend"] = "openai"
    cfg = persona_config(args, {**file_cfg, "personas": section})
    return cfg, api_key(cfg)


def llm_options(args, file_cfg: dict) -> dict:
    """The LLM persona simulator's options: the `llm_persona:` section, then --llm-method and
    --summary-every (flags win)."""
    options = dict(file_cfg.get("llm_persona") or {})
    if getattr(args, "llm_method", None) is not None:
        options["method"] = args.llm_method
    if getattr(args, "summary_every", None) is not None:
        options["summary_every"] = args.summary_every
    return options


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


def reward_spec(args, file_cfg: dict | None = None) -> SimulatorSpec | None:
    """The simulator named by --reward; a hybrid takes its settings from the YAML's `hybrid:` section."""
    if not getattr(args, "reward", None):
        return None
    options = dict((file_cfg or {}).get("hybrid") or {}) if args.reward == "hybrid" else {}
    if args.reward == "llm_persona":
        options = llm_options(args, file_cfg or {})
        from rlsim.simulators.llm_config import llm_sim_config

        llm_sim_config(options)  # a bad llm_persona: section is one line here, not an actor's traceback
    return SimulatorSpec(args.reward, args.reward_checkpoint, args.reward_actor, args.reward_namespace,
                         options=options).validate()


def policy_config(args, file_cfg: dict) -> PolicyConfig:
    cfg = from_dict(PolicyConfig, file_cfg.get("policy"), "policy")
    apply_flags(cfg, args, [("iterations", "iterations"), ("horizon", "horizon"), ("reward_mode", "reward_mode"),
                            ("policy_reward", "reward"), ("skip_penalty", "skip_penalty"),
                            ("exit_after_skips", "exit_after_skips"),
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
    persona_cfg, key = llm_persona_edge(args, file_cfg) if spec.kind == "llm_persona" else (None, None)
    with cli_ray(args, args.num_cpus):
        metrics = train_policy(dcfg, pcfg, spec, out, candidates=cands, ccfg=ccfg, sections=file_cfg,
                               progress=not args.quiet, persona_cfg=persona_cfg, api_key=key)
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
    persona_cfg, key = llm_persona_edge(args, file_cfg) if kind == "llm_persona" else (None, None)
    with cli_ray(args) if kind == "actor" else contextlib.nullcontext():
        m = evaluate_policy(dcfg, args.run, args.out, spec=spec, like_threshold=args.like_threshold,
                            ndcg_k=args.ndcg_k, sections=file_cfg, persona_cfg=persona_cfg, api_key=key)
    show = {"held_out_users": m["held_out_users"],
            "real_hit_rate": {k: round(float(v), 4) for k, v in m["real_hit_rate"].items()},
            "gap_closed_vs_simulator_oracle": round(float(m["gap_closed"]), 4)}
    print(json.dumps(show))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0
