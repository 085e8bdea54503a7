"""LLM personas in the PPO loop against the test server -> bench/results/simulators.json.

PPO (rlsim.policy.train) trains against the LLM persona simulator (rlsim.simulators.llm) through
the fake OpenAI server (tests/fake_openai.py) with 200 ms latency and a 600 requests/min limit of
its own; the simulator's limiter (the cluster's, one per endpoint and model) is set to the same
600/min. It measures, while sampling:

- ``llm_loop_rate_limit_utilisation``: requests the server answered during the sampling phases,
  over what the limit allows in those phases (a phase runs from the end of the previous PPO
  iteration, or the first request for the first iteration, to the last answer before the iteration
  ends; learning is not sampling). ``..._steady`` leaves out the first iteration (start-up).
- ``llm_loop_lost_ratings``: pairs the env runners asked for that ended neither as a distribution
  nor as a recorded failure (the simulator's requested - answered - failed, and the actor's
  pairs - the simulator's requested).
- ``llm_loop_duplicated_ratings``: (user, movie, session) ratings the server delivered more than
  once (the cache and the per-call grouping make each one a single request).
- env steps/s while sampling, requests per env step, 429s sent by the server, failures by reason.

The ratings are the test server's (a formula), so nothing here says how faithful an LLM is.

Run: python bench/llm_loop.py [--data-dir /work/shared/datasets] [--cache-dir DIR]  (~4 minutes: a run
without summaries, whose numbers are the headline keys, and one with a summary every 2 ratings)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlsim.io import write_json  # noqa: E402
from tests.fake_openai import FakeOpenAI, FaultConfig  # noqa: E402

SESSION_LINE = re.compile(r"^(In this session you were shown|Your tastes as they stand now).*$", re.M)


def _windows(iter_end: list[float], ok_t: np.ndarray) -> list[tuple[float, float, int]]:
    """(start, end, answered) of each iteration's sampling phase."""
    out = []
    prev = None
    for end in iter_end:
        lo = prev if prev is not None else (ok_t[ok_t < end].min() if (ok_t < end).any() else end)
        inside = ok_t[(ok_t >= lo) & (ok_t <= end)]
        if len(inside):
            out.append((float(lo), float(inside.max()), int(len(inside))))
        prev = end
    return out


def run_loop(data_dir, cache_dir, work, *, rpm: float = 600.0, latency: float = 0.2, iterations: int = 3,
             num_envs: int = 32, num_env_runners: int = 0, train_batch_size: int = 256, horizon: int = 5,
             dataset: str = "ml-100k", split: str = "u1", method: str = "auto", summary_every: int = 0,
             k_candidates: int = 10) -> dict:
    """Train PPO against the LLM persona through the test server; returns the measurements."""
    import ray

    from rlsim.commands.ray_session import ray_session
    from rlsim.config import DataConfig
    from rlsim.data import load_split
    from rlsim.embeddings import item_text_vectors
    from rlsim.env import build_env_data
    from rlsim.personas.config import PersonaConfig
    from rlsim.policy.config import PolicyConfig
    from rlsim.policy.run import _candidates, split_users
    from rlsim.policy.train import env_config, train_ppo
    from rlsim.simulators.actor import stop_simulator_actor
    from rlsim.simulators.llm_build import start_llm_persona_actor

    work = Path(work)
    dcfg = DataConfig(dataset=dataset, split=split, data_dir=str(data_dir), cache_dir=str(cache_dir), download=False)
    ds, sp = load_split(dcfg)
    from rlsim.candidates import CandidatesConfig

    cands = _candidates(dcfg, ds, sp, None, CandidatesConfig(k=k_candidates), work)
    pcfg = PolicyConfig(horizon=horizon, iterations=iterations, train_batch_size=train_batch_size,
                        minibatch_size=min(128, train_batch_size), num_epochs=2, hidden=32,
                        num_envs_per_env_runner=num_envs, num_env_runners=num_env_runners).validate()
    data = build_env_data(sp.train, ds.items, cands, item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir),
                          ds.scale, dims=pcfg.feature_dims)
    train_rows, _ = split_users(len(data.user_ids), pcfg.holdout_users, pcfg.seed)
    tmp = tempfile.mkdtemp(prefix="rlsim-llm-loop-", dir="/tmp")
    with FakeOpenAI(FaultConfig(latency_s=latency, rpm_limit=rpm)) as srv, \
            ray_session(num_cpus=max(2, num_env_runners + 1), include_dashboard=False, log_to_driver=False,
                        _temp_dir=tmp):
        persona = PersonaConfig(backend="openai", model="fake-model", base_url=srv.base_url, rpm=rpm, tpm=1e9,
                                max_retries=8, timeout_s=30.0, backoff_base_s=0.2, backoff_max_s=2.0)
        name = f"rlsim-llm-loop-{uuid.uuid4().hex[:8]}"
        # A fresh response cache: every rating is a request (a warm cache would need none).
        actor = start_llm_persona_actor(name, ds, sp.train, persona, "bench-key",
                                        {"method": method, "summary_every": summary_every},
                                        cache_dir=str(work / "persona-cache"), text_model=dcfg.text_model)
        # The text vectors live in the shared cache; the persona's response cache in the work folder.
        ends: list[float] = []
        try:
            ecfg = env_config(data, pcfg, simulator_actor=name, user_rows=train_rows)
            t0 = time.monotonic()
            metrics = train_ppo(data, pcfg, work / "ppo", env_cfg=ecfg, on_iteration=lambda row: ends.append(
                time.monotonic()))
            wall = time.monotonic() - t0
            stats = ray.get(actor.stats.remote())
        finally:
            stop_simulator_actor(actor)
        log = list(srv.log)
    ok = [r for r in log if r.status == 200]
    ok_t = np.array(sorted(r.t for r in ok))
    wins = _windows(ends, ok_t)
    rate = rpm / 60.0

    def util(ws):
        span = sum(e - s for s, e, _ in ws)
        return sum(n for _, _, n in ws) / (span * rate) if span > 0 else None

    sim = stats["simulator"]
    # A (user, movie, session) rating delivered more than once by the server is a duplicate.
    seen: dict[tuple, int] = {}
    for r in ok:
        if r.schema_name != "ratings":
            continue
        sess = "\n".join(m.group(0) for m in SESSION_LINE.finditer(r.messages_text))
        for i in r.item_ids:
            k = (r.user_id, i, sess)
            seen[k] = seen.get(k, 0) + 1
    duplicated = sum(v - 1 for v in seen.values())
    lost = (sim["requested"] - sim["answered"] - sim["failed"]) + (stats["pairs"] - sim["requested"])
    sampling_s = sum(e - s for s, e, _ in wins)
    steps = int(metrics["env_steps"])
    return {"llm_loop_rate_limit_utilisation": util(wins),
            "llm_loop_rate_limit_utilisation_steady": util(wins[1:]) if len(wins) > 1 else None,
            "llm_loop_lost_ratings": int(lost), "llm_loop_duplicated_ratings": int(duplicated),
            "failed_ratings": int(sim["failed"]), "failed_by_reason": sim["failed_by_reason"],
            "server_429": sum(1 for r in log if r.status == 429), "requests_answered": len(ok),
            "pairs_requested_by_env_runners": int(stats["pairs"]), "simulator_requested": int(sim["requested"]),
            "answered": int(sim["answered"]), "from_cache": int(sim["from_cache"]), "prompts": int(sim["prompts"]),
            "env_steps": steps, "env_steps_per_s_sampling": round(steps / sampling_s, 2) if sampling_s else None,
            "env_steps_per_s_wall": round(steps / wall, 2),
            "requests_per_env_step": round(sim["requests_sent"] / max(1, steps), 3),
            "simulator_calls_per_env_runner_step": "one per step (all envs of a runner)",
            "actor_requests": stats["requests"], "actor_batches": stats["batches"],
            "sampling_windows": [{"seconds": round(e - s, 2), "answered": n,
                                  "utilisation": round(n / ((e - s) * rate), 4) if e > s else None}
                                 for s, e, n in wins],
            "method": sim["method"], "wall_seconds": round(wall, 1),
            "summary_updates": int(sim["summary_updates"]), "summary_requests": int(
                sim["usage"]["summaries"]["requests"]),
            "config": {"limit_rpm": rpm, "latency_s": latency, "dataset": f"{dataset} {split}", "horizon": horizon,
                       "num_envs_per_env_runner": num_envs, "num_env_runners": num_env_runners,
                       "train_batch_size": train_batch_size, "iterations": iterations, "method": method,
                       "summary_every": summary_every, "limiter": sim["limiter"].get("scope")},
            "note": "ratings are the test server's (a formula): throughput and bookkeeping only, not fidelity"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    p.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", str(REPO / ".cache")))
    p.add_argument("--work", help="work folder (default: a temp dir)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--num-env-runners", type=int, default=0)
    p.add_argument("--train-batch-size", type=int, default=256)
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--summary-every", type=int, default=2, help="the second run's summaries (0: skip it)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "simulators.json"))
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="rlsim-bench-llm-"))
    kw = dict(iterations=args.iterations, num_envs=args.num_envs, num_env_runners=args.num_env_runners,
              train_batch_size=args.train_batch_size, horizon=args.horizon)
    r = run_loop(args.data_dir, args.cache_dir, work / "static-summary", **kw)
    print(json.dumps({k: v for k, v in r.items() if k != "sampling_windows"}, indent=1))
    out = {"llm_loop": r}
    if args.summary_every:  # dynamic users: a Lusifer summary update every N ratings of a session
        d = run_loop(args.data_dir, args.cache_dir, work / "summaries", summary_every=args.summary_every, **kw)
        print(json.dumps({k: v for k, v in d.items() if k != "sampling_windows"}, indent=1))
        out["llm_loop_with_summaries"] = d
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    keys = ("llm_loop_rate_limit_utilisation", "llm_loop_lost_ratings", "llm_loop_duplicated_ratings")
    write_json(args.out, {**prev, **{k: r[k] for k in keys}, **out})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
