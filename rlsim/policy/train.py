"""PPO on the recommendation env with RLlib's new API stack (RLModule + EnvRunner).

Library code: Ray must already be initialised by the caller (the CLI or a job).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from rlsim.env import EnvData, obs_layout
from rlsim.io import write_json
from rlsim.policy.config import PolicyConfig
from rlsim.vector_env import SessionVectorEnv

log = logging.getLogger(__name__)

MODULE_SUBDIR = ("learner_group", "learner", "rl_module", "default_policy")


def env_config(data: EnvData | None, cfg: PolicyConfig, *, data_path: str | None = None, source=None,
               simulator_actor: str | None = None, namespace: str | None = None, user_rows=None) -> dict:
    """The env_config dict RLlib passes to every SessionVectorEnv (one per env runner)."""
    return {"data": data, "data_path": data_path, "source": source, "simulator_actor": simulator_actor,
            "namespace": namespace, "horizon": cfg.horizon, "history": cfg.env_history(), "center": cfg.center,
            "users_per_episode": chain_length(cfg), "reward_mode": cfg.reward_mode,
            "exit_threshold": cfg.exit_threshold, "exit_window": cfg.exit_window, "reward": cfg.reward,
            "skip_penalty": cfg.skip_penalty, "like_threshold": cfg.like_threshold,
            "exit_after_skips": cfg.exit_after_skips,
            "user_rows": None if user_rows is None else [int(r) for r in user_rows]}


def chain_length(cfg: PolicyConfig) -> int:
    return max(1, cfg.users_per_episode) if cfg.horizon == 1 else 1


# Below this many CPUs remote env runners are slower than sampling in the driver (bench/ppo_throughput.py:
# 2 runners on 2 cores, 193-285 env steps/s against 1,620): they, the learner and the simulator actor
# share the cores, and each runner ships its episodes back. From here up at least 4 runners get a core each.
AUTO_RUNNERS_MIN_CPUS = 6
# Cores kept for the driver (the learner with num_learners=0) and the simulator actor.
AUTO_RUNNERS_RESERVED_CPUS = 2
# Each auto runner steps its sessions at least this often per iteration (more runners only add overhead).
AUTO_RUNNERS_MIN_STEPS = 8


def auto_env_runners(cfg: PolicyConfig, cpus: float) -> int:
    """The remote env runners for ``cpus`` CPUs when policy.num_env_runners is unset (None)."""
    if cpus < AUTO_RUNNERS_MIN_CPUS:
        return 0
    by_batch = cfg.train_batch_size // (cfg.num_envs_per_env_runner * AUTO_RUNNERS_MIN_STEPS)
    n = min(int(cpus) - AUTO_RUNNERS_RESERVED_CPUS, by_batch)
    return n if n >= 2 else 0  # one remote runner samples no faster than the driver and adds a round trip


def env_runners(cfg: PolicyConfig) -> int:
    """policy.num_env_runners as given, or auto_env_runners for the CPUs the running Ray reports."""
    if cfg.num_env_runners is not None:
        return cfg.num_env_runners
    import ray

    return auto_env_runners(cfg, float(ray.cluster_resources().get("CPU", 1.0)))


def build_ppo_config(env_cfg: dict, data: EnvData, cfg: PolicyConfig, runners: int | None = None):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from rlsim.policy.connectors import ActionsToEnv, StackObservations
    from rlsim.policy.rl_module import SlateScorerRLModule

    model_config = {**obs_layout(data, cfg.env_history()), "hidden": cfg.hidden}
    return (
        PPOConfig()
        # The env is already vectorised: each runner's N sessions go to the simulator in one request.
        # Discrete actions: nothing to unsquash or clip (RLlib's default would deep-copy every action to do nothing).
        .environment(SessionVectorEnv, env_config=env_cfg, normalize_actions=False, clip_actions=False)
        # runners: the count train_ppo already resolved (and records); None resolves it here.
        .env_runners(num_env_runners=env_runners(cfg) if runners is None else runners,
                     num_envs_per_env_runner=cfg.num_envs_per_env_runner,
                     rollout_fragment_length="auto", gym_env_vectorize_mode="vector_entry_point",
                     # One connector piece each way instead of RLlib's default pipelines (rlsim.policy.connectors).
                     add_default_connectors_to_env_to_module_pipeline=False,
                     add_default_connectors_to_module_to_env_pipeline=False,
                     env_to_module_connector=lambda env, spaces, device: StackObservations(device=device),
                     module_to_env_connector=lambda env, spaces: ActionsToEnv())
        .learners(num_learners=cfg.num_learners, num_gpus_per_learner=cfg.num_gpus_per_learner)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=SlateScorerRLModule, model_config=model_config))
        .training(lr=cfg.lr, train_batch_size_per_learner=cfg.train_batch_size, minibatch_size=cfg.minibatch_size,
                  num_epochs=cfg.num_epochs,
                  # Chained one-step users are independent problems: no credit flows between them.
                  gamma=0.0 if chain_length(cfg) > 1 else cfg.gamma, lambda_=cfg.lambda_, entropy_coeff=cfg.entropy_coeff,
                  vf_loss_coeff=cfg.vf_loss_coeff)
        .debugging(seed=cfg.seed, log_level="ERROR")
    )


def _pick(result: dict, *path, default=None):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return default
        result = result[key]
    return result


def _ratio(a, b):
    return float(a) / float(b) if a is not None and b else None


def iteration_summary(i: int, result: dict, seconds: float) -> dict[str, Any]:
    return {
        "iteration": i,
        "episode_return_mean": _pick(result, "env_runners", "episode_return_mean"),
        "episode_len_mean": _pick(result, "env_runners", "episode_len_mean"),
        "reward_per_step": _ratio(_pick(result, "env_runners", "episode_return_mean"),
                                  _pick(result, "env_runners", "episode_len_mean")),
        "env_steps_sampled": _pick(result, "env_runners", "num_env_steps_sampled_lifetime"),
        "policy_loss": _pick(result, "learners", "default_policy", "policy_loss"),
        "vf_loss": _pick(result, "learners", "default_policy", "vf_loss"),
        "entropy": _pick(result, "learners", "default_policy", "entropy"),
        "seconds": round(seconds, 3),
    }


def env_reward_accounting(algo) -> dict:
    """The rewards every env runner's envs asked of the simulator: answered, failed, failed by reason."""
    from rlsim.vector_env import reward_accounting

    def one(runner):
        env = getattr(runner, "env", None)
        env = getattr(env, "unwrapped", env)
        return env.reward_accounting() if hasattr(env, "reward_accounting") else None

    return reward_accounting([a for a in algo.env_runner_group.foreach_env_runner(one, local_env_runner=True)
                              if a is not None])


def check_failed_share(acc: dict, limit: float, source: str) -> str | None:
    """A one-line reason to stop training when the failed share of rewards exceeds ``limit``, else None."""
    if acc["failed_share"] <= limit:
        return None
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(acc["failed_by_reason"].items(), key=lambda kv: -kv[1]))
    return (f"policy training stopped: {acc['failed']} of {acc['asked']} rewards from {source} failed "
            f"({acc['failed_share']:.1%}; {reasons}), more than policy.max_failed_share {limit:g}; a failed reward "
            "earns the user's mean, so the policy would learn from zeros")


def env_runner_nodes(algo) -> list[str]:
    """The Ray node id of every remote env runner (empty when sampling happens in the driver)."""
    import ray

    try:
        return list(algo.env_runner_group.foreach_env_runner(
            lambda runner: ray.get_runtime_context().get_node_id(), local_env_runner=False))
    except Exception:  # noqa: BLE001 - informative only; never fail a training run over it
        return []


def train_ppo(data: EnvData, cfg: PolicyConfig, out_dir: str | Path, env_cfg: dict | None = None,
              on_iteration: Callable[[dict], None] | None = None, progress: bool = False,
              source: str = "simulator") -> dict:
    """Train, save OUT/checkpoint, write OUT/train_metrics.json; returns the metrics dict.

    ``reward_accounting`` in the metrics: the rewards asked of ``source`` (answered, failed by
    reason). Once the failed share exceeds ``cfg.max_failed_share`` training stops (RewardFailed),
    with the accounting and the reason in train_metrics.json."""
    from tqdm.auto import tqdm

    from rlsim.errors import RewardFailed

    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env_cfg = env_cfg or env_config(data, cfg)
    import warnings

    # RLlib registers the same gymnasium id again on every build in a process (studies train many).
    warnings.filterwarnings("ignore", message=".*Overriding environment rllib-single-agent-env-v0")
    runners = env_runners(cfg)
    algo = build_ppo_config(env_cfg, data, cfg, runners).build_algo()
    runner_nodes = env_runner_nodes(algo)
    history = []
    acc = {"source": source}
    t_start = time.perf_counter()
    bar = tqdm(total=cfg.iterations, desc="PPO", unit="iter", disable=not progress)
    try:
        for i in range(1, cfg.iterations + 1):
            t0 = time.perf_counter()
            row = iteration_summary(i, algo.train(), time.perf_counter() - t0)
            history.append(row)
            acc = {"source": source, **env_reward_accounting(algo), "max_failed_share": cfg.max_failed_share}
            row["rewards_failed"] = acc["failed"]
            stop = check_failed_share(acc, cfg.max_failed_share, source)
            if stop:
                metrics = {"config": vars(cfg), "iterations": history, "reward_accounting": acc,
                           "stopped": {"iteration": i, "reason": stop}}
                write_json(out / "train_metrics.json", metrics)
                raise RewardFailed(stop, metrics)
            log.info("iter %d reward/step %.4f steps %s (%.1fs)", i, row["reward_per_step"] or float("nan"),
                     row["env_steps_sampled"], row["seconds"])
            if on_iteration:
                on_iteration(row)
            bar.update(1)
            bar.set_postfix(reward_per_step=f"{row['reward_per_step'] or float('nan'):.3f}")
            write_json(out / "train_metrics.json", {"config": vars(cfg), "iterations": history,
                                                    "reward_accounting": acc})
        wall = time.perf_counter() - t_start
        ckpt = algo.save(str((out / "checkpoint").resolve()))
        del ckpt
    finally:
        bar.close()
        algo.stop()
    steps = history[-1]["env_steps_sampled"] or 0
    metrics = {"config": vars(cfg), "iterations": history, "wall_seconds": round(wall, 3),
               "env_steps": steps, "env_steps_per_s": round(steps / wall, 1) if wall else None,
               "checkpoint": str(out / "checkpoint"), "num_env_runners": runners, "env_runner_nodes": runner_nodes,
               "reward_accounting": acc}
    write_json(out / "train_metrics.json", metrics)
    return metrics


def load_policy_module(checkpoint: str | Path):
    """The trained SlateScorerRLModule from an algo checkpoint (or from the module folder itself)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    from rlsim.errors import DataError

    p = Path(checkpoint)
    sub = p.joinpath(*MODULE_SUBDIR)
    path = sub if sub.is_dir() else p
    if not path.is_dir():
        raise DataError(f"no policy checkpoint at {p}")
    return RLModule.from_checkpoint(str(path.resolve()))
