"""The policy stage as two library functions: train PPO against a simulator, evaluate it honestly.

``train_policy`` and ``evaluate_policy`` take typed configs and write their run folder; the CLI
(`rlsim policy train|evaluate`), the pipeline and jobs/ all call them. Ray must already be
running (the caller starts or joins it): the simulator lives in one named actor for the run and
every env runner sends it one batched request per step.

Honest evaluation: a seeded share of users (``PolicyConfig.holdout_users``) never reaches
training; ``evaluate_policy`` reports them first, the real held-out ratings of the picks first of
all (hit rate, mean real rating, NDCG beside its floor), and the simulator's own view (gap closed
against the *simulator* oracle) beside it, with the training users' numbers for comparison.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.config import DataConfig, from_dict, to_dict
from rlsim.errors import ConfigError, DataError, RewardFailed
from rlsim.io import read_json, write_json, write_parquet
from rlsim.policy.config import PolicyConfig
from rlsim.simulators import registry
from rlsim.simulators.factory import SimulatorSpec, local_simulator, simulator_factory

log = logging.getLogger(__name__)


def split_users(n_users: int, holdout: float, seed: int,
                eligible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of the env's users: a seeded permutation, both sorted.

    ``eligible`` [n_users] bool: held-out users are drawn only among these (users with held-out
    behaviour; the others could never score a real hit); the count stays round(holdout * n_users),
    at most the eligible users, and every other user trains."""
    if eligible is None:
        eligible = np.ones(n_users, bool)
    eligible = np.asarray(eligible, bool)
    if eligible.shape != (n_users,):
        raise ConfigError(f"split_users: eligible has shape {eligible.shape}, expected ({n_users},)")
    pool = np.flatnonzero(eligible)
    perm = pool[np.random.default_rng(seed).permutation(len(pool))]
    n_held = int(round(holdout * n_users))
    if holdout > 0 and n_held == 0 and n_users > 1:
        n_held = 1
    held = np.sort(perm[:min(n_held, len(pool))])
    return np.setdiff1d(np.arange(n_users), held), held


def held_out_eligible(data, test: pd.DataFrame) -> np.ndarray:
    """[U] bool: the env users with at least one held-out (test) rating."""
    return np.isin(data.user_ids, test["user_id"].unique())


def _persona_cfg(persona_cfg):
    from rlsim.personas.config import PersonaConfig

    return persona_cfg or PersonaConfig()


def _candidates(dcfg: DataConfig, ds, split, candidates, ccfg, out: Path) -> pd.DataFrame:
    from rlsim.candidates import CandidatesConfig, build_candidates
    from rlsim.embeddings import item_text_vectors

    if candidates is not None:
        return candidates
    ccfg = (ccfg or CandidatesConfig()).validate()
    c = build_candidates(split.train, ds.items, item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir), ccfg)
    write_parquet(c, out / "candidates.parquet")
    return c


def train_policy(dcfg: DataConfig, pcfg: PolicyConfig, spec: SimulatorSpec, out: str | Path, *,
                 candidates: pd.DataFrame | None = None, ccfg=None, dataset=None, split=None, progress: bool = True, persona_cfg=None,
                 api_key: str | None = None, source: str | None = None, env_data=None) -> dict:
    """Train PPO on the training users against the simulator ``spec``; writes OUT/{env_data/,
    checkpoint/, train_metrics.json, run.json} and returns the training metrics.

    ``persona_cfg`` (the `personas:` section; default PersonaConfig()) and ``api_key`` reach an LLM persona
    simulator (``spec.kind == "llm_persona"``); the key is never written. ``source`` names the reward
    source in the reward accounting and its errors (default: the spec's label). ``env_data``: the env's
    feature tables when the caller already built them for these candidates and training ratings."""
    import ray

    from rlsim.data import load_split
    from rlsim.embeddings import item_text_vectors
    from rlsim.env import build_env_data
    from rlsim.policy.train import env_config, env_runners, train_ppo
    from rlsim.simulators.actor import LocalSimulator, start_simulator_actor, stop_simulator_actor

    pcfg.validate()
    spec.validate()
    if pcfg.reward != "rating" and not registry.chooses(spec):
        raise ConfigError(f"policy.reward {pcfg.reward} needs a simulated user that chooses what to watch; "
                          f"{spec.kind} only rates (these choose: {registry.choosers_text()})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        dataset, split = load_split(dcfg)
    ds = dataset
    cands = _candidates(dcfg, ds, split, candidates, ccfg, out)
    # A caller that trains many policies on the same split and candidates (the study) builds the
    # env's feature tables once and passes them: they depend on neither the policy's seed nor its source.
    data = env_data if env_data is not None else build_env_data(
        split.train, ds.items, cands, item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir), ds.scale,
        dims=pcfg.feature_dims)
    data.save(out / "env_data")
    eligible = held_out_eligible(data, split.test)
    train_rows, held_rows = split_users(len(data.user_ids), pcfg.holdout_users, pcfg.seed, eligible)
    if not len(train_rows):
        raise ConfigError("no users left to train on (policy.holdout_users too large for this data)")
    write_json(out / "run.json", {
        "data": to_dict(dcfg), "policy": to_dict(pcfg), "reward": asdict(spec),
        "users": {"seed": pcfg.seed, "holdout": pcfg.holdout_users, "train": int(len(train_rows)),
                  "eligible_for_held_out": int(eligible.sum()), "eligible": "users with a test rating",
                  "held_out_user_ids": [int(u) for u in data.user_ids[held_rows]]}})
    actor = local = None
    if spec.kind == "actor":
        name, namespace = spec.actor, spec.namespace
    else:
        name, namespace = f"rlsim-simulator-{uuid.uuid4().hex[:12]}", None
        factory = simulator_factory(spec, ds, split.train, seed=dcfg.seed,
                                    persona_cfg=_persona_cfg(persona_cfg),
                                    text_model=dcfg.text_model, cache_dir=dcfg.cache_dir, api_key=api_key)
        if env_runners(pcfg) == 0 and registry.runs_in_driver(spec):
            # Only the driver samples: the simulator lives there, no actor round trip per step.
            name, local = None, LocalSimulator(factory())
        else:
            # Keep the handle: a non-detached named actor ends with its creator's last handle.
            actor = start_simulator_actor(name, factory)
    def holder_stats() -> dict:  # the simulator's own counts, wherever it ran
        return local.stats() if local is not None else ray.get(actor.stats.remote())

    try:
        ecfg = env_config(data, pcfg, source=local, simulator_actor=name, namespace=namespace, user_rows=train_rows)
        try:
            metrics = train_ppo(data, pcfg, out, env_cfg=ecfg, progress=progress,
                                source=source or spec.label())
        except RewardFailed as exc:  # recorded with the simulator's own view before it stops
            if actor is not None or local is not None:
                exc.metrics["simulator"] = holder_stats()
                write_json(out / "train_metrics.json", exc.metrics)
            raise
        if actor is not None or local is not None:
            metrics["simulator"] = holder_stats()
        metrics["simulator_in"] = "driver" if local is not None else "actor"
    finally:
        if actor is not None:
            stop_simulator_actor(actor)  # in a shared cluster it would outlive this run
    metrics["users"] = {"train": int(len(train_rows)), "held_out": int(len(held_rows))}
    write_json(out / "train_metrics.json", metrics)
    return metrics


def load_run(run: str | Path) -> dict:
    run = Path(run)
    if not (run / "run.json").is_file():
        raise DataError(f"{run} is not a `rlsim policy train` run folder (no run.json)")
    return read_json(run / "run.json")


def check_same_data(meta: dict, dcfg: DataConfig) -> None:
    """A policy is judged on the split it was trained on: another split's test overlaps its training."""
    trained = meta["data"]
    for key in ("dataset", "split", "seed", "test_frac"):
        if key in trained and trained[key] != getattr(dcfg, key):
            raise ConfigError(f"this policy was trained on {trained['dataset']} split {trained['split']} "
                              f"({key}={trained[key]!r}); evaluating it with {key}={getattr(dcfg, key)!r} would "
                              "mix its training ratings into the test")


def judge_users(data, rows, rewards, module, history: int, test: pd.DataFrame, like_threshold: float, ndcg_k: int,
                greedy=None) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """A trained policy's first picks for some users (rows of data): the simulator's view (rewards,
    [U, K] expected ratings) and the real one, beside random, popularity-first, the simulator and real
    oracles (and the greedy scores when given), with each strategy's ranking NDCG. Returns
    (metrics, per-user table, the policy's picks)."""
    from rlsim.policy.evaluate import (evaluate_strategies, held_out_ratings, initial_observations, module_logits,
                                       ranking_ndcg)

    sub, r = data.subset(rows), rewards[rows]
    g = None if greedy is None else greedy[rows]
    logits = module_logits(module, initial_observations(sub, r, history))
    picks = logits.argmax(-1)
    metrics, table = evaluate_strategies(sub, r, {"policy": picks}, test, like_threshold, g)
    scores = {"policy": logits, "popularity": sub.pop_score, "simulator": r, **({"greedy": g} if g is not None else {})}
    metrics["ndcg"] = ranking_ndcg(sub, scores, held_out_ratings(sub, test), ndcg_k)
    metrics["users"] = int(len(rows))
    return metrics, table, picks


def evaluate_policy(dcfg: DataConfig, run: str | Path, out: str | Path, *, spec: SimulatorSpec | None = None,
                    like_threshold: float = 4.0, ndcg_k: int = 10, dataset=None, split=None, persona_cfg=None, api_key: str | None = None) -> dict:
    """Judge a trained policy on its held-out users; writes OUT/{metrics.json, per_user.parquet,
    reward_boxplot.png} and returns the metrics."""
    from rlsim.baselines import evaluate_baselines
    from rlsim.data import load_split
    from rlsim.env import EnvData, score_all
    from rlsim.policy.evaluate import boxplot, evaluate_sessions, module_choices
    from rlsim.policy.train import load_policy_module

    run, out = Path(run), Path(out)
    meta = load_run(run)
    check_same_data(meta, dcfg)
    pcfg = from_dict(PolicyConfig, meta["policy"], "policy")
    spec = (spec or from_dict(SimulatorSpec, meta["reward"], "reward")).validate()
    if dataset is None:
        dataset, split = load_split(dcfg)
    ds = dataset
    data = EnvData.load(run / "env_data")
    held_ids = np.asarray(meta.get("users", {}).get("held_out_user_ids", []), np.int64)
    is_held = np.isin(data.user_ids, held_ids)
    held_rows, train_rows = np.flatnonzero(is_held), np.flatnonzero(~is_held)
    kw = dict(seed=dcfg.seed, persona_cfg=_persona_cfg(persona_cfg), text_model=dcfg.text_model,
              cache_dir=dcfg.cache_dir)
    sim = local_simulator(spec, ds, split.train, **kw, **({"api_key": api_key} if spec.kind == "llm_persona" else {}))
    rewards = score_all(data, sim)  # the simulator's expected rating of every candidate, no session
    # Reward-model greedy: the reward model's favourite when a checkpoint is known, else MF's.
    if spec.kind == "reward_model":
        greedy, greedy_name = rewards, "reward_model"
    elif spec.checkpoint:
        greedy, greedy_name = score_all(data, local_simulator(SimulatorSpec("reward_model", spec.checkpoint), ds,
                                                              split.train, **kw)), "reward_model"
    else:
        greedy, greedy_name = score_all(data, local_simulator(SimulatorSpec("mf"), ds, split.train, **kw)), "mf"
    module = load_policy_module(run / "checkpoint")
    history = pcfg.env_history()
    rows = held_rows if len(held_rows) else train_rows
    metrics, table, _ = judge_users(data, rows, rewards, module, history, split.test, like_threshold, ndcg_k, greedy)
    seen = None
    if len(held_rows) and len(train_rows):
        seen, _, _ = judge_users(data, train_rows, rewards, module, history, split.test, like_threshold, ndcg_k,
                                 greedy)
    if pcfg.horizon > 1:  # the numbers above are the first pick; this is the whole session
        sub = data.subset(rows)
        metrics["session"] = evaluate_sessions(sub, rewards[rows], lambda o: module_choices(module, o),
                                               pcfg.horizon, history)
    result = {"dataset": dcfg.dataset, "split": split.summary(), "reward": asdict(spec),
              "simulator": getattr(sim, "describe", lambda: {})(), "greedy_source": greedy_name,
              "evaluated_on": "held_out_users" if len(held_rows) else "training_users (policy.holdout_users is 0)",
              "held_out_users": int(len(held_rows)), "k": data.k, "like_threshold": like_threshold, **metrics,
              "real_hit_rate": {n: metrics[n]["hit_rate"] for n in ("policy", "random", "popularity", "greedy",
                                                                    "simulator_oracle", "real_oracle")},
              "gap_closed_held_out": metrics["gap_closed"] if len(held_rows) else None,
              "train_users": None if seen is None else {
                  "users": seen["users"], "gap_closed": seen["gap_closed"],
                  "real_hit_rate": {n: seen[n]["hit_rate"] for n in ("policy", "random", "popularity")}},
              "baselines": evaluate_baselines(split.train, split.test, ds.scale, seed=dcfg.seed)}
    write_json(out / "metrics.json", result)
    write_parquet(table, out / "per_user.parquet")
    boxplot(table, out / "reward_boxplot.png",
            f"{dcfg.dataset}: held-out users, simulated rating of the pick ({spec.label()})")
    return result
