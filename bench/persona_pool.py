"""Persona pool benchmark against the fake OpenAI server -> bench/results/persona_pool.json.

(a) rate-limit utilisation: server limit 600 requests/min, 200 ms latency; achieved rate and
    429s (sent by the server / passed on as failures);
(b) orchestration overhead: ratings per second with a zero-latency, unlimited server;
(c) prompt tokens per rating with batching (server-reported usage on real ml-100k prompts);
(d) 20% injected faults + one kill -9 of the `rlsim personas rate` job, then resume: lost ratings
    (counted against the planned pairs: every held-out pair of the users the job selected) and
    duplicated ratings;
(e) tokens-per-minute utilisation: ~500-token requests (server-reported prompt + completion
    tokens) under a tokens/min limit, requests/min unlimited;
(f) two concurrent `rlsim personas rate` processes joining one Ray cluster (--ray-address), one
    endpoint, the same --rpm: their combined rate against the limit (one limiter per cluster);
(g) hostile servers (tests/hostile.py: usage x3, no usage, reasoning tokens, completions to
    max_tokens, 429 storms, slow drip), all six at once, each a run of > 60 s at 300 requests/min
    with a budget it would cross: overrun of the budget (what the server billed), the busiest real
    60 s window against the limit, lost and duplicated ratings.

Run: python bench/persona_pool.py [--data-dir /work/shared/datasets] [--cache-dir /tmp/rlc]  (~6 minutes)
     python bench/persona_pool.py --only hostile  (~2 minutes: updates the `hostile` keys, keeps the others)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlsim.config import DataConfig  # noqa: E402
from rlsim.data import load_split  # noqa: E402
from rlsim.personas.backends import BackendSpec  # noqa: E402
from rlsim.personas.config import PersonaConfig  # noqa: E402
from rlsim.personas.grounding import WorkUnit  # noqa: E402
from rlsim.personas.job import dry_run, run_rating_job  # noqa: E402
from rlsim.personas.stages_common import sample_users  # noqa: E402
from rlsim.embeddings import item_text_vectors  # noqa: E402
from rlsim.personas.source import prompt_builder  # noqa: E402
from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating  # noqa: E402
from tests.hostile import MODES, run_mode  # noqa: E402


def build_units(data_dir: str, cache_dir: str, n_users: int, batch_size: int = 10):
    dcfg = DataConfig(dataset="ml-100k", data_dir=data_dir, cache_dir=cache_dir, split="u1", download=False)
    ds, split = load_split(dcfg)
    users = np.sort(split.test["user_id"].unique())[:n_users]
    pairs = split.test[split.test["user_id"].isin(users)][["user_id", "item_id"]]
    cfg = PersonaConfig(batch_size=batch_size)
    vec = item_text_vectors(ds.items, dcfg.text_model, cache_dir)
    return prompt_builder(ds, split.train, cfg, vec, users=users).units(pairs)


def pool_cfg(**kw) -> PersonaConfig:
    base = dict(backend="openai", model="fake-model", cache=False, max_retries=8, timeout_s=10.0,
                backoff_base_s=0.05, backoff_max_s=1.0, n_workers=2, max_concurrency=16, shard_users=10)
    base.update(kw)
    return PersonaConfig(**base)


def phase_rate_limit(units, workdir: Path, rpm: float, latency: float, seconds: float) -> dict:
    n = int(rpm / 60 * seconds)
    units = units[:n]
    with FakeOpenAI(FaultConfig(latency_s=latency, rpm_limit=rpm)) as srv:
        spec = BackendSpec("openai", "fake-model", srv.base_url, api_key="bench")
        t0 = time.monotonic()
        s = run_rating_job(units, workdir / "a", spec, pool_cfg(rpm=rpm), None, use_ray=True, progress=False)
        wall = time.monotonic() - t0
        ok_t = sorted(r.t for r in srv.log if r.status == 200)
        # Steady state: the middle 80% of arrivals (start-up builds HTTP clients, the tail drains).
        lo, hi = int(0.1 * len(ok_t)), int(0.9 * len(ok_t)) - 1
        achieved = (hi - lo) / (ok_t[hi] - ok_t[lo]) * 60 if hi > lo else 0.0
        whole = len(ok_t) / (ok_t[-1] - ok_t[0]) * 60 if len(ok_t) > 1 else 0.0
        df = pd.read_parquet(workdir / "a" / "ratings.parquet")
        return {"limit_rpm": rpm, "latency_s": latency, "requests_ok": len(ok_t),
                "achieved_rpm": achieved, "rate_limit_utilisation": achieved / rpm,
                "achieved_rpm_first_to_last": whole,
                "server_429_sent": srv.count(429), "leaked_429": int((df["reason"] == "http_429").sum()),
                "failed": s["failed"], "wall_s": wall}


def phase_overhead(units, workdir: Path) -> dict:
    with FakeOpenAI(FaultConfig()) as srv:
        spec = BackendSpec("openai", "fake-model", srv.base_url, api_key="bench")
        t0 = time.monotonic()
        s = run_rating_job(units, workdir / "b", spec, pool_cfg(rpm=1e9, tpm=1e12), None, use_ray=True,
                           progress=False)
        wall = time.monotonic() - t0
        usage = s["usage"]
        return {"ratings": s["rated"], "requests": usage["requests"], "wall_s": wall,
                "ratings_per_s": s["rated"] / wall, "requests_per_s": usage["requests"] / wall,
                "prompt_tokens_per_rating_server": usage["prompt_tokens"] / max(1, s["rated"]),
                "failed": s["failed"]}


def _kill_tree(proc: subprocess.Popen, ray_tmp: str) -> int:
    """kill -9 the job's process group, then any Ray process it left under its own temp dir."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if ray_tmp in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def phase_kill_resume(data_dir: str, cache_dir: str, workdir: Path, n_users: int, fault_rate: float) -> dict:
    p = fault_rate / 5
    faults = FaultConfig(latency_s=0.05, p_429=p, p_500=p, p_malformed=p, p_missing=p, p_truncated=p,
                         retry_after_s=0.1, seed=7)
    cache = workdir / "cache"
    shutil.copytree(cache_dir, cache, dirs_exist_ok=True, ignore=shutil.ignore_patterns("personas"))
    out = workdir / "d"
    with FakeOpenAI(faults) as srv:
        ray_tmp = tempfile.mkdtemp(prefix="rlsim-ray-bench-")
        env = {**os.environ, "OPENAI_BASE_URL": srv.base_url, "OPENAI_API_KEY": "bench",
               "RLSIM_RAY_TEMP_DIR": ray_tmp, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "rlsim.cli", "personas", "rate", "--backend", "openai", "--dataset", "ml-100k",
               "--split", "u1", "--data-dir", data_dir, "--cache-dir", str(cache), "--no-download",
               "--model", "fake-model", "--users", str(n_users), "--max-retries", "10", "--rpm", "3000",
               "--shard-users", "5",
               "--quiet", "--out", str(out)]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        manifest = out / "job" / "manifest.json"
        done_at_kill = 0
        while proc.poll() is None and time.monotonic() - t0 < 240:
            if manifest.is_file():
                try:
                    done_at_kill = len(json.loads(manifest.read_text())["shards"])
                except (json.JSONDecodeError, KeyError):
                    done_at_kill = 0
                if done_at_kill >= 3:
                    break
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError("the job finished before it could be killed: " + proc.stderr.read().decode()[-2000:])
        requests_before = len(srv.log)
        leftovers = _kill_tree(proc, ray_tmp)
        r = subprocess.run(cmd, env={**env, "RLSIM_RAY_TEMP_DIR": tempfile.mkdtemp(prefix="rlsim-ray-bench-")},
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
        wall = time.monotonic() - t0
        df = pd.read_parquet(out / "job" / "ratings.parquet")
        m = json.loads(manifest.read_text())
        expected_pairs = {u for s in m["plan"].values() for u in s}  # unit ids
        dcfg = DataConfig(dataset="ml-100k", data_dir=data_dir, cache_dir=str(cache), split="u1", download=False)
        _, split = load_split(dcfg)
        # The planned pairs: every held-out pair of the users the job selected (the CLI's own sample),
        # not only users that made it into the output.
        planned_users = sample_users(split.test["user_id"], n_users, dcfg.seed)
        truth = split.test[split.test["user_id"].isin(planned_users)]
        want = set(zip(truth["user_id"], truth["item_id"]))
        got_ok = set(zip(df.loc[df.status == "ok", "user_id"], df.loc[df.status == "ok", "item_id"]))
        wrong = int(sum(r != expected_rating(u, i) for u, i, r in zip(df["user_id"], df["item_id"], df["rating"])
                        if not np.isnan(r)))
        faulty = sum(1 for x in srv.log if x.fault)
        return {"fault_rate": fault_rate, "users": n_users, "units": len(expected_pairs),
                "shards_done_at_kill": done_at_kill, "planned_shards": len(m["plan"]),
                "requests_before_kill": requests_before, "requests_total": len(srv.log),
                "faulty_responses": faulty, "observed_fault_share": faulty / max(1, len(srv.log)),
                "ray_processes_cleaned": leftovers, "pairs_expected": len(want), "rows": len(df),
                "users_planned": int(len(planned_users)), "users_in_output": int(df["user_id"].nunique()),
                "retried_on_resume": m.get("summary", {}).get("retried"),
                "lost_ratings": len(want - got_ok), "leaked_429": int((df["reason"] == "http_429").sum()), "duplicated_ratings": int(df.duplicated(["user_id", "item_id"]).sum()),
                "wrong_ratings": wrong, "resumed": m.get("resumed", 0), "wall_s": wall}


def phase_tpm(workdir: Path, tpm: float, latency: float, seconds: float, tokens_per_request: int = 500) -> dict:
    """~500-token requests under a tokens/min limit (requests/min unlimited): achieved tokens/min."""
    per_s = tpm / 60 / tokens_per_request
    n = int(per_s * seconds) + 2
    pad = " Enjoys long, quiet films with slow pacing, strong characters and an unhurried, careful story."
    units = []
    for u in range(1, n + 1):
        text = f"A viewer number {u}."
        while len(text) < 4 * (tokens_per_request - 95):  # ~95 tokens of system prompt, scale and movie line
            text += pad
        items = [{"item_id": 1000 + u, "title": f"Film {u}", "year": 1995, "genres": "Drama"}]
        units.append(WorkUnit(u, [1000 + u], text, items, {}, (1.0, 5.0, 1.0)))
    with FakeOpenAI(FaultConfig(latency_s=latency)) as srv:
        spec = BackendSpec("openai", "fake-model", srv.base_url, api_key="bench")
        t0 = time.monotonic()
        s = run_rating_job(units, workdir / "e", spec, pool_cfg(rpm=1e9, tpm=tpm, shard_users=1000), None,
                           use_ray=True, progress=False)
        wall = time.monotonic() - t0
        log = sorted((r for r in srv.log if r.status == 200), key=lambda r: r.t)
        tok = [r.prompt_tokens + r.completion_tokens for r in log]
        lo, hi = int(0.1 * len(log)), int(0.9 * len(log)) - 1
        achieved = sum(tok[lo:hi]) / (log[hi].t - log[lo].t) * 60 if hi > lo else 0.0
        whole = sum(tok[:-1]) / (log[-1].t - log[0].t) * 60 if len(log) > 1 else 0.0
        return {"limit_tpm": tpm, "latency_s": latency, "requests_ok": len(log),
                "tokens_per_request_server": float(np.mean(tok)) if tok else 0.0,
                "achieved_tpm": achieved, "tpm_utilisation": achieved / tpm,
                "achieved_tpm_first_to_last": whole, "failed": s["failed"], "wall_s": wall}


def phase_two_jobs(data_dir: str, cache_dir: str, workdir: Path, gcs_address: str, rpm: float,
                   users_per_job: int) -> dict:
    """Two `rlsim personas rate` processes on one cluster, one endpoint, the same --rpm each."""
    dcfg = DataConfig(dataset="ml-100k", data_dir=data_dir, cache_dir=cache_dir, split="u1", download=False)
    _, split = load_split(dcfg)
    users = np.sort(split.test["user_id"].unique())
    pair_files = []
    for j in range(2):
        mine = users[j * users_per_job:(j + 1) * users_per_job]
        f = workdir / f"pairs{j}.parquet"
        split.test[split.test["user_id"].isin(mine)][["user_id", "item_id"]].to_parquet(f, index=False)
        pair_files.append((f, set(int(u) for u in mine)))
    with FakeOpenAI(FaultConfig(latency_s=0.2, rpm_limit=rpm)) as srv:
        env = {**os.environ, "OPENAI_BASE_URL": srv.base_url, "OPENAI_API_KEY": "bench", "PYTHONPATH": str(REPO)}
        procs = []
        t0 = time.monotonic()
        for j, (f, _) in enumerate(pair_files):
            cmd = [sys.executable, "-m", "rlsim.cli", "personas", "rate", "--backend", "openai", "--dataset", "ml-100k",
                   "--split", "u1", "--data-dir", data_dir, "--cache-dir", cache_dir, "--no-download",
                   "--model", "fake-model", "--pairs", str(f), "--rpm", str(rpm), "--no-cache", "--quiet",
                   "--ray-address", gcs_address, "--out", str(workdir / f"f{j}")]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for pr in procs:
            _, err = pr.communicate(timeout=600)
            if pr.returncode != 0:
                raise RuntimeError(err.decode()[-3000:])
        wall = time.monotonic() - t0
        log = sorted((r for r in srv.log if r.status == 200), key=lambda r: r.t)
        t_a = [r.t for r in log if r.user_id in pair_files[0][1]]
        t_b = [r.t for r in log if r.user_id in pair_files[1][1]]
        start, end = max(t_a[0], t_b[0]), min(t_a[-1], t_b[-1])
        both = [t for t in (r.t for r in log) if start <= t <= end]
        combined = (len(both) - 1) / (end - start) * 60 if end > start and len(both) > 1 else 0.0
        summaries = [json.loads((workdir / f"f{j}" / "summary.json").read_text()) for j in range(2)]
        return {"limit_rpm_each": rpm, "requests": [len(t_a), len(t_b)], "overlap_s": end - start,
                "combined_rpm_in_overlap": combined, "two_jobs_rpm": combined / rpm,
                "server_429_sent": srv.count(429), "failed": [s["failed"] for s in summaries],
                "limiters": sorted({s["limits"]["limiter"] for s in summaries}), "wall_s": wall}


def phase_hostile(units, workdir: Path, rpm: float = 300.0, seconds: float = 75.0, share: float = 0.85) -> dict:
    """Every hostile mode at once (its own server and limiter), each a run of ~``seconds`` at ``rpm``
    whose budget is ``share`` of what the whole run would be charged (measured on a short calibration
    run without a budget), so the run crosses it near its end."""
    from concurrent.futures import ThreadPoolExecutor

    n = int(rpm / 60 * seconds)
    units = units[:n]

    def one(mode: str) -> tuple[str, dict]:
        cal = run_mode(mode, units[:6], workdir / f"g-{mode}-cal", 1e6, None, 60.0)
        per_request = cal["spent_usd_client"] / max(1, cal["answered"])
        budget = share * per_request * len(units)
        return mode, {**run_mode(mode, units, workdir / f"g-{mode}", rpm, budget, 60.0), "units": len(units)}

    with ThreadPoolExecutor(len(MODES)) as ex:
        res = dict(ex.map(one, sorted(MODES)))
    keys = ("budget_overrun_usd", "max_60s_rpm_over_limit", "lost", "duplicated")
    return {"summary": {m: {k: r[k] for k in keys} for m, r in res.items()}, "details": res,
            "faults": MODES, "rpm": rpm, "budget_share": share}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", "/work/shared/datasets"))
    ap.add_argument("--cache-dir", default="/tmp/rlc")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the rate-limit phase")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "persona_pool.json"))
    ap.add_argument("--only", choices=["hostile"], help="run this phase only and update its keys in --out")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from rlsim.io import write_json

    t_all = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="rlsim-bench-personas-"))
    units = build_units(a.data_dir, a.cache_dir, n_users=200)
    if a.only == "hostile":
        g_res = phase_hostile(units, work)
        result = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {"details": {}}
        result["hostile"] = g_res["summary"]
        result.setdefault("details", {})["hostile"] = g_res
        write_json(a.out, result)
        print(json.dumps(result["hostile"], indent=1))
        shutil.rmtree(work, ignore_errors=True)
        return
    est = dry_run(units, BackendSpec("openai", "gpt-4o-mini"), PersonaConfig())
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rlsim-ray-bench-", dir="/tmp"))
    try:
        a_res = phase_rate_limit(units, work, rpm=600, latency=0.2, seconds=a.seconds)
        b_res = phase_overhead(units[:600], work)
        e_res = phase_tpm(work, tpm=60000, latency=0.2, seconds=a.seconds)
        f_res = phase_two_jobs(a.data_dir, a.cache_dir, work, ray.get_runtime_context().gcs_address, rpm=600,
                               users_per_job=30)
    finally:
        ray.shutdown()
    d_res = phase_kill_resume(a.data_dir, a.cache_dir, work, n_users=60, fault_rate=0.2)
    g_res = phase_hostile(units, work)
    result = {
        "rate_limit_utilisation": a_res["rate_limit_utilisation"],
        "tpm_utilisation": e_res["tpm_utilisation"],
        "two_jobs_rpm": f_res["two_jobs_rpm"],
        "leaked_429": a_res["leaked_429"] + d_res["leaked_429"],
        "lost_ratings": d_res["lost_ratings"],
        "duplicated_ratings": d_res["duplicated_ratings"],
        "prompt_tokens_per_rating": b_res["prompt_tokens_per_rating_server"],
        "ratings_per_s": b_res["ratings_per_s"],
        "hostile": g_res["summary"],
        "details": {"hostile": g_res, "rate_limit": a_res, "overhead": b_res, "kill_resume": d_res, "tokens_per_minute": e_res,
                    "two_jobs": f_res,
                    "dry_run_estimate_gpt_4o_mini": est,
                    "setup": "ml-100k u1 prompts (structured profile, batch 10, k_similar 3); 2 Ray actors x 16 "
                             "concurrent requests; fake OpenAI server in-process (tests/fake_openai.py)",
                    "total_wall_s": time.monotonic() - t_all},
    }
    write_json(a.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
