"""Where one PPO training iteration spends its time, per run of bench/ppo_throughput.py.

For every run (the same settings, simulators and data as the throughput benchmark) one iteration is
trained to warm up, then ONE iteration under cProfile (the driver's Python: sampling in the driver
with 0 env runners, the learner always) and one more under torch.profiler (the learner's torch ops).
The compact torch PPO's second iteration is profiled the same way. Writes
bench/results/ppo_profile.json: per run the iteration's seconds, the top functions by cumulative and
by self time with their share of the iteration, self time summed by package area, and the top torch
ops by self CPU time.

    python bench/ppo_profile.py --data-dir ../shared/datasets [--reward-checkpoint runs/reward/checkpoint]

With remote env runners the driver's profile shows the driver only (waiting on the runners is
``ray.get``/``wait``); the runners' own time is in their sampling timer, reported beside it.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ppo_throughput import PPO, VARIANTS, parser, prepare, run_env_config, start_simulators, torch_setup  # noqa: E402,E501

TOP = 25
# Self time is summed into these areas (first match on the function's file path wins).
AREAS = [("rlsim/vector_env", "rlsim.vector_env"), ("rlsim/simulators", "rlsim.simulators"),
         ("rlsim/reward", "rlsim.reward (world model)"), ("rlsim/policy", "rlsim.policy"), ("rlsim/", "rlsim other"),
         ("rllib/connectors", "rllib connectors"), ("rllib/env", "rllib env runner"),
         ("rllib/core/learner", "rllib learner"), ("rllib/core/rl_module", "rllib rl_module"),
         ("rllib/utils/metrics", "rllib metrics"), ("rllib/", "rllib other"), ("torch/", "torch (python)"),
         ("numpy/", "numpy (python)"), ("gymnasium/", "gymnasium"), ("tree/", "dm-tree"),
         ("ray/", "ray core"), ("asyncio/", "asyncio"), ("threading", "threading")]


ROOT = str(Path(__file__).resolve().parents[1]) + "/"  # this checkout: its files show as rlsim/...


def short(func: tuple) -> str:
    path, line, name = func
    for marker in ("site-packages/", ROOT, "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line}({name})" if path != "~" else name


def area(func: tuple) -> str:
    path = func[0]
    if path == "~":  # a builtin: torch's C ops and numpy's show up here
        name = func[2]
        return ("torch (C)" if "torch" in name else "numpy (C)" if "numpy" in name
                else "ray.get / wait" if "ray" in name or "acquire" in name or "select" in name else "builtins")
    return next((label for key, label in AREAS if key in path), "other python")


def summarise(prof: cProfile.Profile, seconds: float) -> dict:
    st = pstats.Stats(prof).stats  # func -> (primitive calls, calls, self s, cumulative s, callers)
    rows = [(short(f), nc, tt, ct, area(f)) for f, (cc, nc, tt, ct, _) in st.items()]

    def top(key: int) -> list[dict]:
        return [{"function": r[0], "calls": r[1], "self_s": round(r[2], 4), "cum_s": round(r[3], 4),
                 "self_share": round(r[2] / seconds, 4), "cum_share": round(r[3] / seconds, 4)}
                for r in sorted(rows, key=lambda r: -r[key])[:TOP]]

    areas: dict[str, float] = {}
    for r in rows:
        areas[r[4]] = areas.get(r[4], 0.0) + r[2]
    return {"iteration_s": round(seconds, 4), "profiled_self_s": round(sum(r[2] for r in rows), 4),
            "self_by_area": {k: {"self_s": round(v, 4), "share": round(v / seconds, 4)}
                             for k, v in sorted(areas.items(), key=lambda kv: -kv[1])},
            "top_cumulative": top(3), "top_self": top(2)}


def torch_ops(fn) -> dict:
    """torch.profiler over fn(): the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    secs = time.perf_counter() - t0
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev) / 1e6
    return {"iteration_s_under_torch_profiler": round(secs, 4), "torch_self_cpu_s": round(total, 4),
            "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 4),
                         "share_of_torch": round(e.self_cpu_time_total / 1e6 / total, 4) if total else 0.0}
                        for e in ev[:15]]}


def profile_rllib(data, pcfg, env_cfg) -> dict:
    from rlsim.policy.train import build_ppo_config

    algo = build_ppo_config(env_cfg, data, pcfg).build_algo()
    try:
        algo.train()  # warm-up: actor lookup, static table, torch first-call costs
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        res = algo.train()
        prof.disable()
        out = summarise(prof, time.perf_counter() - t0)
        timers = res.get("timers", {})
        out["rllib_timers_s"] = {k: round(float(timers[k]), 4) for k in
                                 ("env_runner_sampling_timer", "learner_update_timer", "training_iteration")
                                 if timers.get(k) is not None}
        out["torch_profiler"] = torch_ops(algo.train)
    finally:
        algo.stop()
    return out


def profile_torch_ppo(ds, split, data) -> dict:
    """The compact torch PPO's second iteration (the first warms up), profiled from its per-iteration hook."""
    from rlsim.policy.torch_ppo import train_torch_ppo

    table, tenv, tcfg = torch_setup(ds, split, data, iterations=2)
    prof = cProfile.Profile()
    marks = []

    def hook(row):
        marks.append(time.perf_counter())
        if len(marks) == 1:
            prof.enable()

    t = train_torch_ppo(table, tenv, tcfg, log=hook)
    prof.disable()
    return summarise(prof, t["history"][-1]["seconds"])


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--runs", default=",".join(v[0] for v in VARIANTS) + ",torch_ppo_static_mf_h1",
                    help="comma-separated run names (default: every run of bench/ppo_throughput.py)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ppo_profile.json"))
    args = ap.parse_args(argv)
    t_wall = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]

    import ray

    from rlsim.policy.config import PolicyConfig

    wanted = args.runs.split(",")
    ds, split, data, ckpt = prepare(args)
    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "dataset": args.dataset,
                    "split": args.split, "cpus": args.num_cpus, "obs_dim": int(data.user_dim + data.k * data.cand_dim),
                    **PPO, "runs": {}}
    try:
        sims = start_simulators(ds, split, ckpt)
        for name, sim, kw in VARIANTS:
            if name not in wanted:
                continue
            pcfg = PolicyConfig(**PPO, **kw).validate()
            ecfg, _ = run_env_config(data, pcfg, name, sim, sims)
            r = profile_rllib(data, pcfg, ecfg)
            r.update(simulator=sim, simulator_in="driver" if ecfg["source"] is not None else "actor", settings=kw,
                     load_avg_1m_after=round(os.getloadavg()[0], 2))
            result["runs"][name] = r
            write(args.out, result)  # after every run: a long profile leaves what it has
            print(name, r["iteration_s"], r["self_by_area"], flush=True)
        if "torch_ppo_static_mf_h1" in wanted:
            r = profile_torch_ppo(ds, split, data)
            r["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
            result["runs"]["torch_ppo_static_mf_h1"] = r
            print("torch_ppo_static_mf_h1", r["iteration_s"], r["self_by_area"], flush=True)
        del sims
    finally:
        ray.shutdown()
    result["wall_seconds"] = round(time.perf_counter() - t_wall, 1)
    result["load_avg_start"] = load_start
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    write(args.out, result)
    print(f"wrote {args.out}")
    return 0


def write(path: str, result: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
