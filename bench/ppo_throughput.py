"""Env steps per second of PPO against simulated users: RLlib (0 and 2 env runners) and the compact
torch PPO, for the static table, sampled baseline ratings and the reward model as a world model.

Every run trains in SessionVectorEnv over RankZero candidates. Its simulator lives where `rlsim
policy train` puts it: in the driver when only the driver samples (0 env runners), else in ONE
named actor (rlsim.simulators.actor) that every env runner sends one batched request per step; the
"_actor" runs keep the actor with 0 runners to show what its round trip costs. The static run
scores a table once instead. Same network, same batch settings. Writes
bench/results/ppo_throughput.json, with its command line, wall time and load average; the ratios
static_over_torch and sampled_over_static come from runs of the same process, and the compact torch PPO
runs right after RLlib's static run (on a shared machine the load drifts over the benchmark's minutes;
it ran last until this round).

    python bench/ppo_throughput.py --data-dir ../shared/datasets [--reward-checkpoint runs/reward/checkpoint]

Without --reward-checkpoint a reward model is trained first with the library defaults (~2 min).
"world_model_steps_per_s" is the issue #9 goal: the reward model as a session-conditioned world
model (sampled ratings, horizon 10) at >= 1,000 env steps/s on 2 cores.

Profiling notes (ML-100K, K=25, 2 shared cores; bench/ppo_profile.py writes the profile of each run):
- The learner dominated the first version (a [B, K, 3H] concat MLP, H=128); the scorer now meets
  user and candidate in one additive hidden layer (H=64): learner cost fell ~8x.
- Horizon-1 episodes make RLlib pay per-episode bookkeeping on every step; chaining one-step users
  into one episode with gamma=0 (the same problem) halves it.
- A sampled step costs one simulator request for all of a runner's envs; with the reward model the
  request is one transformer forward over the runner's sessions (history tokens included).
- With 0 runners the actor's round trip (ray.get, ~5 ms a step on a loaded 2-core machine) was 16-23%
  of a sampled iteration (bench/results/ppo_profile_main.json): the simulator now lives in the driver.
- SessionVectorEnv.step ran a Python loop over its envs; it is array operations now (same draws).
- With 2 cores, 2 remote env runners are not faster than sampling in the driver: the learner, the
  runners and the simulator actor compete for the same cores (policy.num_env_runners unset picks 0 there).
- The observation was a Dict (features, action mask) that RLlib's connectors walked with dm-tree on every
  step and batch; it is one flat float32 Box now (rlsim.env.ObsLayout). Measured per part (CPU seconds of
  a static iteration, no profiler): RLlib's GAE pass ran the network over the whole 4,000-row batch with
  autograd on, 1.2-2.7x per row what a minibatch costs (out of the CPU caches): the values now come with the
  sampling pass (VF_PREDS) and only the bootstrap rows are run. The env runner's default connector
  pipelines (5 + 6 pieces a step) are one piece each way (rlsim.policy.connectors). What is left is
  RLlib's learner (34 minibatches of 500 rows where the compact PPO has 32, of 500 and 380 rows: the
  bootstrap row of each episode chunk) and its per-step episode bookkeeping.
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


def session_cpu_s() -> float:
    """CPU seconds (user + system) of this process and every process under it: the local Ray it
    started (GCS, raylet, env runners, the simulator actor). On a shared machine wall time is mostly
    the others' load; the CPU this session spent per env step is not."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    mine = {os.getpid()}
    for pid in sorted(parent):  # descendants: walk up each process's parents
        chain, p = [], pid
        while p in parent and p not in mine and p > 1:
            chain.append(p)
            p = parent[p]
        if p in mine:
            mine.update(chain)
    return sum(cpu.get(p, 0.0) for p in mine)


def timing(iters: list[tuple[int, float, float]]) -> dict:
    """Steps/s of (env steps, wall s, session CPU s) per timed iteration: the mean over them, the best
    iteration's (the one least slowed by other processes on a shared machine), and env steps per CPU
    second of the whole session (the ratios use it: it does not move with the machine's load)."""
    steps, secs, cpu = sum(i[0] for i in iters), sum(i[1] for i in iters), sum(i[2] for i in iters)
    return {"env_steps": int(steps), "seconds": round(secs, 3), "steps_per_s": round(steps / secs, 1),
            "steps_per_s_best_iteration": round(max(i[0] / i[1] for i in iters), 1),
            "cpu_seconds": round(cpu, 3), "steps_per_cpu_s": round(steps / cpu, 1),
            # Session CPU over wall: below 1 when it waited for a core (or on a round trip).
            "cpu_over_wall": round(cpu / secs, 3)}


def rllib_run(data, ecfg, pcfg, iterations: int) -> dict:
    from rlsim.policy.train import build_ppo_config, iteration_summary

    algo = build_ppo_config(ecfg, data, pcfg).build_algo()
    try:
        # Warm-up: actor lookup, static table, torch first-call costs.
        prev = iteration_summary(0, algo.train(), 0.0)["env_steps_sampled"]
        rows, timers, iters = [], [], []
        for i in range(iterations):
            t0, c0 = time.perf_counter(), session_cpu_s()
            res = algo.train()
            dt, dc = time.perf_counter() - t0, session_cpu_s() - c0
            rows.append(iteration_summary(i + 1, res, dt))
            iters.append((rows[-1]["env_steps_sampled"] - prev, dt, dc))
            prev = rows[-1]["env_steps_sampled"]
            timers.append({k: res.get("timers", {}).get(k) for k in
                           ("env_runner_sampling_timer", "learner_update_timer", "training_iteration")})
    finally:
        algo.stop()
    mean = lambda k: sum(t[k] or 0 for t in timers) / len(timers)  # noqa: E731
    return {**timing(iters), "sampling_s_per_iter": round(mean("env_runner_sampling_timer"), 3),
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


# Throughput-oriented PPO settings (bigger batches, fewer epochs), the same for every run.
PPO = dict(train_batch_size=4000, minibatch_size=500, num_epochs=4, lr=1e-3)
# name, simulator, policy settings: the runs of this benchmark (bench/ppo_profile.py profiles the same ones).
# Each run reaches its simulator as `rlsim policy train` would (rlsim.policy.train.env_runners,
# rlsim.simulators.registry.runs_in_driver): in the driver when only the driver samples, else through
# the shared actor; "_actor" runs keep the actor with 0 runners to show what its round trip costs.
VARIANTS = [
    ("static_mf_h1_0_runners", "mf", dict(reward_mode="static", num_env_runners=0, num_envs_per_env_runner=32)),
    ("sampled_mf_h1_0_runners", "mf", dict(num_env_runners=0, num_envs_per_env_runner=32)),
    ("sampled_mf_h1_0_runners_actor", "mf", dict(num_env_runners=0, num_envs_per_env_runner=32)),
    ("sampled_mf_h1_2_runners", "mf", dict(num_env_runners=2, num_envs_per_env_runner=16)),
    ("sampled_mf_h1_one_user_per_episode", "mf", dict(num_env_runners=0, num_envs_per_env_runner=32,
                                                      users_per_episode=1)),
    ("world_model_h10_0_runners", "reward_model", dict(horizon=10, num_env_runners=0, num_envs_per_env_runner=64)),
    ("world_model_h10_0_runners_actor", "reward_model", dict(horizon=10, num_env_runners=0,
                                                             num_envs_per_env_runner=64)),
    ("world_model_h10_2_runners", "reward_model", dict(horizon=10, num_env_runners=2, num_envs_per_env_runner=32)),
]


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--split", default="u1")
    ap.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR"))
    ap.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", "~/.cache/rlsim"))
    ap.add_argument("--reward-checkpoint", help="reward model checkpoint (default: train one)")
    ap.add_argument("--num-cpus", type=int, default=2)
    return ap


def prepare(args):
    """(dataset, split, EnvData, reward checkpoint) for the runs, and Ray started with args.num_cpus."""
    import ray
    import torch

    from rlsim.candidates import CandidatesConfig, build_candidates
    from rlsim.commands.ray_session import quiet_ray
    from rlsim.config import DataConfig
    from rlsim.data import load_split
    from rlsim.embeddings import item_text_vectors
    from rlsim.env import build_env_data

    torch.set_num_threads(1)
    dcfg = DataConfig(dataset=args.dataset, split=args.split, data_dir=args.data_dir, cache_dir=args.cache_dir,
                      download=False)
    ds, split = load_split(dcfg)
    emb = item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir)
    cands = build_candidates(split.train, ds.items, emb, CandidatesConfig())
    data = build_env_data(split.train, ds.items, cands, emb, ds.scale)
    ckpt = reward_checkpoint(dcfg, args.reward_checkpoint)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _temp_dir=tempfile.mkdtemp(prefix="rlsim-bench-", dir="/tmp"),
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    quiet_ray(False, rllib=True)
    return ds, split, data, ckpt


def start_simulators(ds, split, ckpt) -> dict:
    """simulator name -> (its actor handle, a LocalSimulator of it in this process)."""
    from rlsim.simulators.actor import LocalSimulator, start_simulator_actor
    from rlsim.simulators.factory import SimulatorSpec, simulator_factory

    return {kind: (start_simulator_actor(f"bench-{kind}", simulator_factory(spec, ds, split.train)),
                   LocalSimulator(simulator_factory(spec, ds, split.train)()))
            for kind, spec in (("mf", SimulatorSpec("mf")), ("reward_model", SimulatorSpec("reward_model", ckpt)))}


def run_env_config(data, pcfg, name: str, sim: str, sims: dict):
    """(env_config, a zero-argument stats getter) for a run: where its simulator lives, as the policy stage decides."""
    import ray

    from rlsim.policy.train import env_config, env_runners
    from rlsim.simulators import registry
    from rlsim.simulators.factory import SimulatorSpec

    actor, local = sims[sim]
    if env_runners(pcfg) == 0 and registry.runs_in_driver(SimulatorSpec(sim)) and not name.endswith("_actor"):
        return env_config(data, pcfg, source=local), local.stats
    return env_config(data, pcfg, simulator_actor=f"bench-{sim}"), lambda: ray.get(actor.stats.remote())


def torch_setup(ds, split, data, iterations: int):
    """(static-table EnvData, env_config, TorchPPOConfig) of the compact torch PPO run: RLlib's static run."""
    from rlsim.env import score_all
    from rlsim.policy.config import PolicyConfig
    from rlsim.policy.torch_ppo import TorchPPOConfig
    from rlsim.policy.train import env_config
    from rlsim.simulators.factory import SimulatorSpec, simulator_factory

    base = PolicyConfig(**PPO, reward_mode="static")
    tcfg = TorchPPOConfig(iterations=iterations, num_envs=32, steps_per_iteration=base.train_batch_size,
                          minibatch_size=base.minibatch_size, num_epochs=base.num_epochs, lr=base.lr)
    table = data.with_rewards(score_all(data, simulator_factory(SimulatorSpec("mf"), ds, split.train)()))
    return table, env_config(None, base), tcfg


def torch_run(ds, split, data, iterations: int) -> dict:
    """The compact torch PPO on RLlib's static run's table, timed as rllib_run times RLlib."""
    from rlsim.policy.torch_ppo import train_torch_ppo

    table, tenv, tcfg = torch_setup(ds, split, data, iterations + 1)
    marks = []  # (wall, session CPU) at the end of each iteration
    t = train_torch_ppo(table, tenv, tcfg, log=lambda row: marks.append((time.perf_counter(), session_cpu_s())))
    hist = t["history"]  # the first iteration warms up, as with RLlib
    iters = [(hist[i]["env_steps"] - hist[i - 1]["env_steps"], marks[i][0] - marks[i - 1][0],
              marks[i][1] - marks[i - 1][1]) for i in range(1, len(hist))]
    out = {**timing(iters), "settings": {"num_envs": 32, "reward_mode": "static"},
           "reward_per_step_last": hist[-1]["reward_per_step"], "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    print("torch_ppo", json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ppo_throughput.json"))
    args = ap.parse_args(argv)
    t_wall = time.perf_counter()
    load_before = os.getloadavg()

    import ray

    from rlsim.policy.config import PolicyConfig

    ds, split, data, ckpt = prepare(args)
    ppo = PPO
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                     "dataset": args.dataset, "split": args.split, "users": int(len(data.user_ids)), "k": data.k,
                     "obs_dim": int(data.user_dim + data.k * data.cand_dim),
                     # The flat observation of a horizon-1 session: obs_dim's features, then the K-wide action mask.
                     "obs_size": int(data.user_dim + data.k * data.cand_dim + data.k), "cpus": args.num_cpus,
                     "machine": platform.processor() or platform.machine(), "iterations_timed": args.iterations,
                     **ppo, "runs": {}}
    try:
        sims = start_simulators(ds, split, ckpt)
        for name, sim, kw in VARIANTS:
            if name == VARIANTS[1][0]:  # the compact torch PPO right after RLlib's static run, the ratio's two sides
                results["runs"]["torch_ppo_static_mf_h1"] = torch_run(ds, split, data, args.iterations)
            pcfg = PolicyConfig(**ppo, **kw).validate()
            ecfg, stats = run_env_config(data, pcfg, name, sim, sims)
            before = stats()
            r = rllib_run(data, ecfg, pcfg, args.iterations)
            after = stats()
            r["simulator"] = sim
            r["simulator_in"] = "driver" if ecfg["source"] is not None else "actor"
            r["settings"] = kw
            r["simulator_requests"] = after["requests"] - before["requests"]
            r["simulator_batches"] = after["batches"] - before["batches"]
            r["simulator_pairs"] = after["pairs"] - before["pairs"]
            r["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
            results["runs"][name] = r
            print(name, json.dumps(r), flush=True)
    finally:
        ray.shutdown()
    runs = results["runs"]
    results["rllib_steps_per_s_static"] = runs["static_mf_h1_0_runners"]["steps_per_s"]
    results["rllib_steps_per_s_sampled_0_runners"] = runs["sampled_mf_h1_0_runners"]["steps_per_s"]
    results["rllib_steps_per_s_sampled_2_runners"] = runs["sampled_mf_h1_2_runners"]["steps_per_s"]
    results["world_model_steps_per_s"] = max(runs["world_model_h10_0_runners"]["steps_per_s"],
                                             runs["world_model_h10_2_runners"]["steps_per_s"])
    results["world_model_h10_steps_per_s"] = results["world_model_steps_per_s"]
    results["torch_steps_per_s_static"] = runs["torch_ppo_static_mf_h1"]["steps_per_s"]
    # Ratios of runs of this one process (same machine, same reward tables): what RLlib costs over the
    # compact torch PPO, and what a sampled simulator costs over the static table, in env steps per CPU
    # second of the whole session (the machine is shared: wall time moves with the others' load); the
    # ratios of the mean and of the best iteration's steps/s beside them.
    def ratios(key: str) -> tuple[float, float]:
        v = {k: r[key] for k, r in runs.items()}
        return (round(v["static_mf_h1_0_runners"] / v["torch_ppo_static_mf_h1"], 3),
                round(v["sampled_mf_h1_0_runners"] / v["static_mf_h1_0_runners"], 3))

    results["static_over_torch"], results["sampled_over_static"] = ratios("steps_per_cpu_s")
    results["static_over_torch_wall"], results["sampled_over_static_wall"] = ratios("steps_per_s")
    results["static_over_torch_best_iteration"], results["sampled_over_static_best_iteration"] = \
        ratios("steps_per_s_best_iteration")
    wm = [runs[k] for k in ("world_model_h10_0_runners", "world_model_h10_2_runners")]
    results["world_model_h10_steps_per_s_best_iteration"] = max(r["steps_per_s_best_iteration"] for r in wm)
    results["world_model_h10_steps_per_cpu_s"] = max(r["steps_per_cpu_s"] for r in wm)
    results["target_world_model_steps_per_s"] = 1000
    results["meets_target"] = results["world_model_steps_per_s"] >= 1000
    results["wall_seconds"] = round(time.perf_counter() - t_wall, 1)
    results["load_avg_start"] = [round(x, 2) for x in load_before]
    results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
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
