"""`rlsim policy train|evaluate`: RLlib PPO over RankZero candidates, and its per-user evaluation.

train writes OUT/{env_data/, checkpoint/, train_metrics.json, run.json}; evaluate reads that run
folder and writes OUT/{metrics.json, per_user.parquet, reward_boxplot.png}.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
from pathlib import Path

from rlsim.cli import add_data_args, apply_flags, data_config, load_config_file
from rlsim.commands.ray_session import ray_session
from rlsim.config import DataConfig, from_dict, to_dict
from rlsim.errors import ConfigError, DataError
from rlsim.policy.config import PolicyConfig

log = logging.getLogger(__name__)
REWARDS = ("bias", "mf", "model", "personas", "actor")


def register(sub) -> None:
    p = sub.add_parser("policy", help="PPO policy over RankZero candidates")
    s = p.add_subparsers(dest="policy_command", required=True)

    t = s.add_parser("train", help="train PPO (RLlib new API stack) against a reward source")
    add_data_args(t)
    t.add_argument("--out", required=True, help="run folder")
    _reward_args(t)
    t.add_argument("--candidates", help="candidates.parquet or a `rlsim candidates build` folder "
                                        "(default: build them now with the candidates: config)")
    t.add_argument("--iterations", type=int, help="PPO iterations (default 15)")
    t.add_argument("--horizon", type=int, help="picks per episode (1 = the paper's one-shot setting)")
    t.add_argument("--num-env-runners", type=int, help="remote env runners (0 = sample in the driver)")
    t.add_argument("--num-envs", type=int, help="vectorised envs per env runner")
    t.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    t.set_defaults(func=cmd_train)

    e = s.add_parser("evaluate", help="per-user policy vs random / oracle / popularity / greedy")
    add_data_args(e)
    e.add_argument("--run", required=True, help="the `rlsim policy train` run folder")
    e.add_argument("--out", required=True, help="output folder (metrics.json, per_user.parquet, PNG)")
    _reward_args(e, required=False)
    e.add_argument("--like-threshold", type=float, default=4.0, help="held-out rating counted as a hit")
    e.set_defaults(func=cmd_evaluate)


def _reward_args(p, required: bool = True) -> None:
    p.add_argument("--reward", choices=REWARDS, default="mf" if required else None,
                   help="reward source: bias | mf (baselines), model (--reward-checkpoint), personas "
                        "(offline persona, personas: config), actor (a running named actor with score()); "
                        "evaluate defaults to the training run's")
    p.add_argument("--reward-checkpoint", help="reward model checkpoint folder (for --reward model)")
    p.add_argument("--reward-actor", help="name of a running actor exposing score(users, items) (--reward actor)")
    p.add_argument("--reward-namespace", help="Ray namespace of --reward-actor")
    p.add_argument("--ray-address", help="join a running Ray cluster (where --reward-actor lives) instead of "
                                         "starting a local one")


# ---------------------------------------------------------------------------------- sources

def reward_spec(args, fallback: dict | None = None) -> dict:
    spec = dict(fallback or {})
    if getattr(args, "reward", None):
        spec = {"kind": args.reward, "checkpoint": args.reward_checkpoint, "actor": args.reward_actor,
                "namespace": args.reward_namespace}
    kind = spec.get("kind")
    if kind == "model" and not spec.get("checkpoint"):
        raise ConfigError("--reward model needs --reward-checkpoint DIR (from `rlsim reward train`)")
    if kind == "actor" and not spec.get("actor"):
        raise ConfigError("--reward actor needs --reward-actor NAME")
    if kind not in REWARDS:
        raise ConfigError(f"unknown reward source {kind!r}")
    return spec


def _persona_source(ds, train, dcfg: DataConfig, persona_cfg: dict):
    from rlsim.personas.config import PersonaConfig
    from rlsim.embeddings import item_text_vectors
    from rlsim.personas.source import persona_reward_source

    pcfg = from_dict(PersonaConfig, persona_cfg, "personas")
    if pcfg.backend != "offline":
        raise ConfigError("--reward personas trains against the offline persona; for an LLM persona pool start it "
                          "and pass --reward actor --reward-actor NAME")
    return persona_reward_source(ds, train, pcfg, item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir))


def source_factory(spec: dict, ds, train, dcfg: DataConfig, file_cfg: dict):
    """A picklable zero-argument callable building the source (inside the reward actor)."""
    from rlsim.sources import BaselineRewardSource, ModelRewardSource

    kind = spec["kind"]
    if kind in ("bias", "mf"):
        return functools.partial(BaselineRewardSource.fit, kind, train, ds.scale, dcfg.seed)
    if kind == "model":
        if not Path(spec["checkpoint"]).exists():
            raise ConfigError(f"reward checkpoint not found: {spec['checkpoint']}")
        return functools.partial(ModelRewardSource.load, spec["checkpoint"])
    if kind == "personas":
        return functools.partial(_persona_source, ds, train, dcfg, file_cfg.get("personas"))
    raise ConfigError(f"reward source {kind!r} has no in-process factory")


def local_source(spec: dict, ds, train, dcfg, file_cfg):
    """The source in this process (evaluation); a running named actor for --reward actor."""
    if spec["kind"] == "actor":
        from rlsim.sources import RemoteRewardSource

        return RemoteRewardSource(spec["actor"], spec.get("namespace"), scale=ds.scale)
    return source_factory(spec, ds, train, dcfg, file_cfg)()


# ---------------------------------------------------------------------------------- helpers

def policy_config(args, file_cfg: dict) -> PolicyConfig:
    cfg = from_dict(PolicyConfig, file_cfg.get("policy"), "policy")
    apply_flags(cfg, args, [("iterations", "iterations"), ("horizon", "horizon"),
                            ("num_env_runners", "num_env_runners"), ("num_envs", "num_envs_per_env_runner")])
    return cfg.validate()


def load_candidates(args, file_cfg, ds, split, dcfg, out: Path):
    import pandas as pd

    from rlsim.candidates import CandidatesConfig, build_candidates
    from rlsim.embeddings import item_text_vectors
    from rlsim.io import write_parquet

    if args.candidates:
        p = Path(args.candidates)
        p = p / "candidates.parquet" if p.is_dir() else p
        if not p.is_file():
            raise DataError(f"candidates not found: {p}")
        return pd.read_parquet(p)
    ccfg = from_dict(CandidatesConfig, file_cfg.get("candidates"), "candidates").validate()
    c = build_candidates(split.train, ds.items, item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir), ccfg)
    write_parquet(c, out / "candidates.parquet")
    return c


def ray_for_policy(num_cpus: int | None, address: str | None = None):
    """Join the running Ray (a job, the pipeline) or start a private local one."""
    # A short temp dir of our own: Ray's socket paths must stay under ~100 characters.
    return ray_session(address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                       _temp_dir=None if address else tempfile.mkdtemp(prefix="rlsim-ray-", dir="/tmp"))


# ---------------------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from rlsim.embeddings import item_text_vectors
    from rlsim.data import load_split
    from rlsim.env import build_env_data
    from rlsim.io import write_json
    from rlsim.policy.train import env_config, train_ppo
    from rlsim.sources import get_or_create_reward_actor

    file_cfg = load_config_file(args)
    dcfg = data_config(args, file_cfg)
    pcfg = policy_config(args, file_cfg)
    spec = reward_spec(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds, split = load_split(dcfg)
    cands = load_candidates(args, file_cfg, ds, split, dcfg, out)
    data = build_env_data(split.train, ds.items, cands, item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir), ds.scale,
                          dims=pcfg.feature_dims)
    data.save(out / "env_data")
    write_json(out / "run.json", {"data": to_dict(dcfg), "policy": to_dict(pcfg), "reward": spec})
    with ray_for_policy(args.num_cpus, args.ray_address) as ray:
        if spec["kind"] == "actor":
            actor_name, namespace = spec["actor"], spec.get("namespace")
        else:
            # Env runners find the source by name and score a user's whole slate per call (cached).
            actor_name, namespace = f"rlsim-reward-{os.getpid()}", None
            # Keep the handle: a non-detached named actor dies with its last handle.
            actor = get_or_create_reward_actor(actor_name, source_factory(spec, ds, split.train, dcfg, file_cfg))
        ecfg = env_config(data, pcfg, reward_actor=actor_name, namespace=namespace)
        metrics = train_ppo(data, pcfg, out, env_cfg=ecfg)
        if spec["kind"] != "actor":
            metrics["reward_actor_stats"] = ray.get(actor.stats.remote())
            write_json(out / "train_metrics.json", metrics)
            # In a shared cluster the actor would outlive this command: end it here.
            ray.kill(actor)
    last = metrics["iterations"][-1]
    print(json.dumps({"iterations": len(metrics["iterations"]), "reward_per_step": last["reward_per_step"],
                      "env_steps_per_s": metrics["env_steps_per_s"]}))
    print(f"wrote {out / 'checkpoint'}")
    return 0


def cmd_evaluate(args) -> int:
    import numpy as np

    from rlsim.baselines import evaluate_baselines
    from rlsim.data import load_split
    from rlsim.env import EnvData, score_all
    from rlsim.io import read_json, write_json, write_parquet
    from rlsim.policy.evaluate import (boxplot, evaluate_sessions, evaluate_strategies, initial_observations,
                                       module_choices)
    from rlsim.policy.train import load_policy_module

    run = Path(args.run)
    if not (run / "run.json").is_file():
        raise DataError(f"{run} is not a `rlsim policy train` run folder (no run.json)")
    meta = read_json(run / "run.json")
    file_cfg = load_config_file(args)
    if "data" not in file_cfg:
        file_cfg = {**file_cfg, "data": meta["data"]}
    dcfg = data_config(args, file_cfg)
    pcfg = from_dict(PolicyConfig, meta["policy"], "policy")
    spec = reward_spec(args, meta["reward"])
    ds, split = load_split(dcfg)
    data = EnvData.load(run / "env_data")
    source = local_source(spec, ds, split.train, dcfg, file_cfg)
    # Only an external actor source needs Ray; the others score in this process.
    with ray_for_policy(None, args.ray_address) if spec["kind"] == "actor" else contextlib.nullcontext():
        rewards = score_all(data, source)
    # Reward-model-greedy: the reward model's favourite when one is given, else MF's.
    if spec["kind"] == "model":
        greedy, greedy_name = rewards, "model"
    elif spec.get("checkpoint"):
        greedy, greedy_name = score_all(data, source_factory({"kind": "model", "checkpoint": spec["checkpoint"]},
                                                             ds, split.train, dcfg, file_cfg)()), "model"
    else:
        greedy, greedy_name = score_all(data, source_factory({"kind": "mf"}, ds, split.train, dcfg, file_cfg)()), "mf"
    module = load_policy_module(run / "checkpoint")
    obs = initial_observations(data, rewards, pcfg.env_history())
    choices = {"policy": module_choices(module, obs)}
    metrics, table = evaluate_strategies(data, rewards, choices, split.test, args.like_threshold, greedy)
    if pcfg.horizon > 1:  # the numbers above are the first pick; this is the whole session
        metrics["session"] = evaluate_sessions(data, rewards, lambda o: module_choices(module, o),
                                               pcfg.horizon, pcfg.env_history())
    out = Path(args.out)
    result = {"dataset": dcfg.dataset, "split": split.summary(), "reward": spec, "greedy_source": greedy_name,
              "users": int(len(data.user_ids)), "k": data.k, **metrics,
              "baselines": evaluate_baselines(split.train, split.test, ds.scale, seed=dcfg.seed)}
    write_json(out / "metrics.json", result)
    write_parquet(table, out / "per_user.parquet")
    boxplot(table, out / "reward_boxplot.png", f"{dcfg.dataset}: per-user reward ({spec['kind']})")
    print(json.dumps({k: round(float(metrics[k]["mean_reward"]), 4) for k in
                      ("random", "popularity", "greedy", "policy", "oracle") if k in metrics}
                     | {"gap_closed": round(float(np.nan_to_num(metrics["gap_closed"])), 4)}))
    print(f"wrote {out / 'metrics.json'}")
    return 0
