"""Env steps per second of PPO against simulated users: RLlib (0 and 2 env runners) and the compact
torch PPO, for the static table, sampled baseline ratings and the reward model as a world model.

Every run trains in SessionVectorEnv over RankZero candidates with the simulator in ONE named actor
(rlsim.simulators.actor) that every env runner sends one batched request per step; the static run
scores a table once instead. Same network, same batch settings. Writes bench/results/ppo_throughput.json.

    python bench/ppo_throughput.py --data-dir ../shared/datasets [--reward-checkpoint runs/reward/checkpoint]

Without --reward-checkpoint a reward model is trained first with the library defaults (~2 min).
"world_model_steps_per_s" is the issue #9 goal: the reward model as a session-conditioned world
model (sampled ratings, horizon 10) at >= 1,000 env steps/s on 2 cores.

Profiling notes (ML-100K, K=25, 2 shared cores):
- The learner dominated the first version (a [B, K, 3H] concat MLP, H=128); the scorer now meets
  user and candidate in one additive hidden layer (H=64): learner cost fell ~8x.
- Horizon-1 episodes make RLlib pay per-episode bookkeeping on every step; chaining one-step users
  into one episode with gamma=0 (the same problem) halves it.
- A sampled step costs one simulator request for all of a runner's envs; with the reward model the
  request is one transformer forward over the runner's sessions (history tokens included).
- With 2 cores, 2 remote env runners are not faster than sampling in the driver: the learner, the
  runners and the simulator actor compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rllib_run(data, ecfg, pcfg, iterations: int) -> dict:
    from rlsim.policy.train import build_ppo_config, iteration_summary

    algo = build_ppo_config(ecfg, data, pcfg).build_algo()
    try:
        algo.train()  # warm-up: actor lookup, static table, torch first-call costs
        t0 = time.perf_counter()
        rows, timers = [], []
        for i in range(iterations):
            res = algo.train()
            rows.append(iteration_summary(i + 1, res, 0.0))
            timers.append({k: res.get("timers", {}).get(k) for k in
                           ("env_runner_sampling_timer", "learner_update_timer", "training_iteration")})
        secs = time.perf_counter() - t0
        steps0 = rows[0]["env_steps_sampled"]
        per_iter = (rows[-1]["env_steps_sampled"] - steps0) / max(1, len(rows) - 1)
    finally:
        algo.stop()
    steps = rows[-1]["env_steps_sampled"] - steps0 + per_iter  # the first timed iteration too
    mean = lambda k: sum(t[k] or 0 for t in timers) / len(timers)  # noqa: E731
    return {"env_steps": int(steps), "seconds": round(secs, 3), "steps_per_s": round(steps / secs, 1),
            "sampling_s_per_iter": round(mean("env_runner_sampling_timer"), 3),
            "learner_s_per_iter": round(mean("learner_update_timer"), 3),
            "reward_per_step_last": rows[-1]["reward_per_step"]}


def reward_checkpoint(dcfg, given: str | None) -> str:
    if given:
        return given
    from rlsim.reward.config import RewardConfig
    from rlsim.reward.train import train_reward_model

    out = Path(tempfile.mkdtemp(prefix="rlsim-bench-reward-"))
    print(f"training a reward model into {out} (pass --reward-checkpoint to skip)", flush=True)
    train_reward_model(dcfg, RewardConfig(), out)
    return str(out / "checkpoint")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--split", default="u1")
    ap.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR"))
    ap.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", "~/.cache/rlsim"))
    ap.add_argument("--reward-checkpoint", help="reward model checkpoint (default: train one)")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ppo_throughput.json"))
    args = ap.parse_args(argv)

    import ray
    import torch

    from rlsim.candidates import CandidatesConfig, build_candidates
    from rlsim.commands.ray_session import quiet_ray
    from rlsim.config import DataConfig
    from rlsim.data import load_split
    from rlsim.embeddings import item_text_vectors
    from rlsim.env import build_env_data, score_all
    from rlsim.policy.config import PolicyConfig
    from rlsim.policy.torch_ppo import TorchPPOConfig, train_torch_ppo
    from rlsim.policy.train import env_config
    from rlsim.simulators.actor import start_simulator_actor
    from rlsim.simulators.factory import SimulatorSpec, simulator_factory

    torch.set_num_threads(1)
    dcfg = DataConfig(dataset=args.dataset, split=args.split, data_dir=args.data_dir, cache_dir=args.cache_dir,
                      download=False)
    ds, split = load_split(dcfg)
    emb = item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir)
    cands = build_candidates(split.train, ds.items, emb, CandidatesConfig())
    data = build_env_data(split.train, ds.items, cands, emb, ds.scale)
    ckpt = reward_checkpoint(dcfg, args.reward_checkpoint)
    # Throughput-oriented PPO settings (bigger batches, fewer epochs), the same for every run.
    ppo = dict(train_batch_size=4000, minibatch_size=500, num_epochs=4, lr=1e-3)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _temp_dir=tempfile.mkdtemp(prefix="rlsim-bench-", dir="/tmp"),
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    quiet_ray(False, rllib=True)
    results: dict = {"dataset": args.dataset, "split": args.split, "users": int(len(data.user_ids)), "k": data.k,
                     "obs_dim": int(data.user_dim + data.k * data.cand_dim), "cpus": args.num_cpus,
                     "machine": platform.processor() or platform.machine(), "iterations_timed": args.iterations,
                     **ppo, "runs": {}}
    actors = {}
    try:
        for kind, spec in (("mf", SimulatorSpec("mf")), ("reward_model", SimulatorSpec("reward_model", ckpt))):
            actors[kind] = start_simulator_actor(f"bench-{kind}", simulator_factory(spec, ds, split.train))
        variants = [
            # name, simulator, policy settings
            ("static_mf_h1_0_runners", "mf", dict(reward_mode="static", num_env_runners=0, num_envs_per_env_runner=32)),
            ("sampled_mf_h1_0_runners", "mf", dict(num_env_runners=0, num_envs_per_env_runner=32)),
            ("sampled_mf_h1_2_runners", "mf", dict(num_env_runners=2, num_envs_per_env_runner=16)),
            ("sampled_mf_h1_one_user_per_episode", "mf", dict(num_env_runners=0, num_envs_per_env_runner=32,
                                                              users_per_episode=1)),
            ("world_model_h10_0_runners", "reward_model", dict(horizon=10, num_env_runners=0,
                                                               num_envs_per_env_runner=64)),
            ("world_model_h10_2_runners", "reward_model", dict(horizon=10, num_env_runners=2,
                                                               num_envs_per_env_runner=32)),
        ]
        for name, sim, kw in variants:
            pcfg = PolicyConfig(**ppo, **kw).validate()
            before = ray.get(actors[sim].stats.remote())
            r = rllib_run(data, env_config(data, pcfg, simulator_actor=f"bench-{sim}"), pcfg, args.iterations)
            after = ray.get(actors[sim].stats.remote())
            r["simulator"] = sim
            r["settings"] = kw
            r["simulator_requests"] = after["requests"] - before["requests"]
            r["simulator_batches"] = after["batches"] - before["batches"]
            r["simulator_pairs"] = after["pairs"] - before["pairs"]
            results["runs"][name] = r
            print(name, json.dumps(r), flush=True)
        base = PolicyConfig(**ppo, reward_mode="static")
        tcfg = TorchPPOConfig(iterations=args.iterations + 1, num_envs=32, steps_per_iteration=base.train_batch_size,
                              minibatch_size=base.minibatch_size, num_epochs=base.num_epochs, lr=base.lr)
        table = data.with_rewards(score_all(data, simulator_factory(SimulatorSpec("mf"), ds, split.train)()))
        t = train_torch_ppo(table, env_config(None, base), tcfg)
        hist = t["history"][1:]  # same warm-up rule as RLlib
        steps = hist[-1]["env_steps"] - t["history"][0]["env_steps"]
        secs = sum(h["seconds"] for h in hist)
        results["runs"]["torch_ppo_static_mf_h1"] = {"env_steps": steps, "seconds": round(secs, 3),
                                                     "steps_per_s": round(steps / secs, 1),
                                                     "settings": {"num_envs": 32, "reward_mode": "static"},
                                                     "reward_per_step_last": hist[-1]["reward_per_step"]}
        print("torch_ppo", json.dumps(results["runs"]["torch_ppo_static_mf_h1"]), flush=True)
    finally:
        ray.shutdown()
    runs = results["runs"]
    results["rllib_steps_per_s_static"] = runs["static_mf_h1_0_runners"]["steps_per_s"]
    results["rllib_steps_per_s_sampled_0_runners"] = runs["sampled_mf_h1_0_runners"]["steps_per_s"]
    results["rllib_steps_per_s_sampled_2_runners"] = runs["sampled_mf_h1_2_runners"]["steps_per_s"]
    results["world_model_steps_per_s"] = max(runs["world_model_h10_0_runners"]["steps_per_s"],
                                             runs["world_model_h10_2_runners"]["steps_per_s"])
    results["torch_steps_per_s_static"] = runs["torch_ppo_static_mf_h1"]["steps_per_s"]
    results["target_world_model_steps_per_s"] = 1000
    results["meets_target"] = results["world_model_steps_per_s"] >= 1000
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    # The simulator benchmark's JSON carries the world-model figure too (issue #9's evidence file).
    sims = out.parent / "simulators.json"
    if sims.is_file():
        d = json.loads(sims.read_text())
        d["world_model_steps_per_s"] = results["world_model_steps_per_s"]
        d["world_model_setting"] = ("PPO (RLlib) against the reward model as a session-conditioned world model: "
                                    "sampled ratings, horizon 10, best of 0 runners x 64 sessions and 2 runners x 32 "
                                    f"({args.num_cpus} CPUs; bench/ppo_throughput.py)")
        sims.write_text(json.dumps(d, indent=2) + "\n")
        print(f"updated {sims}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
