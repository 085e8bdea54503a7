"""Persona rating at scale -> bench/results/persona_scale.json.

(a) "actors": ratings/s against the number of PersonaWorker actors (1, 2, 4, 8) through the pool
    against the fake OpenAI server (tests/fake_openai.py) at 300 ms latency, batch 10 movies per
    request, 4 requests in flight per actor, with a limit (2,400 requests/min, server-side token
    bucket and the job's --rpm) that the actors reach at 4: ratings/s doubles from 1 to 2 actors
    and stops at the limit.
(b) "goal": 1,200 requests/min at 300 ms latency (2 actors x 16 in flight, the defaults): achieved
    rate / limit in the steady middle 80% of the run, and 429s (sent by the server, leaked into
    the ratings).
(c) "rss_growth": 10k and 100k synthetic users x 20 pairs (200k and 2M ratings) through the Ray
    pool, each in a fresh driver process; this process samples /proc/<pid>/status (VmRSS and the
    kernel's high-water mark VmHWM) of the driver and of its PersonaWorker processes every 0.5 s.
(d) "kill_resume": the 100k-user job killed with SIGKILL (its process group and every process
    under it) when 40% of its shards are done, then rerun into the same folder: lost and duplicated
    ratings (against the planned pairs and against the uninterrupted run of (c)), shards taken from
    their files, rows replayed from the journal, time.

The scale runs (c, d) use the offline backend (no requests; answers from a stand-in for the fitted
offline persona: the fake server's rating formula, so every rating can be checked against its
(user, item)) on WorkUnits built per shard by a UnitSource (users 1..N, 20 movies each, from a
formula): at 1,200 requests/min, 100k users x 20 pairs at batch 10 would be 200k requests, 2.8
hours; the offline backend pushes 2M ratings through the same job machinery (plan, window, journal,
shards, streamed ratings.parquet) in minutes. The data layer is not used for 100k users (it would
measure loading synthetic-25m and fitting the offline persona on 20M ratings, not the pool).

Run: python bench/persona_scale.py  (~12 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for _child
from _child import descendants, proc_cmdline, proc_status  # noqa: E402

PAIRS_PER_USER = 20
N_ITEMS = 10_000
LATENCY_S = 0.3
BATCH = 10
SWEEP_RPM = 2400
SWEEP_CONCURRENCY = 4
GOAL_RPM = 1200

# Measured once with this script's sampler on the code before the fix (commit a40c8bc: every row
# kept, every unit submitted at once, one frame at the end; units passed as a list since there was
# no UnitSource). Not re-run here: that code is gone.
BEFORE_FIX = {"commit": "a40c8bc", "driver_peak_mb": {"10k": 709.3, "100k": 4391.4},
              "worker_peak_mb": {"10k": 350.3, "100k": 1426.4}, "wall_s": {"10k": 26.7, "100k": 351.0},
              "driver_rss_growth": round((4391.4 - 709.3) / 709.3, 3)}


class FormulaModel:
    """Stand-in for the fitted offline persona: the fake server's rating of (user, item)."""

    def predict_raw(self, users, items):
        return (1 + (np.asarray(users) * 7 + np.asarray(items)) % 5).astype(float)


def user_items(u: int) -> list[int]:
    return [1 + (u * 37 + j * 501) % N_ITEMS for j in range(PAIRS_PER_USER)]  # 20 distinct movies


def synthetic_source(n_users: int):
    from rlsim.personas.grounding import UnitSource, WorkUnit, unit_id_of

    def build(users):
        return [WorkUnit(int(u), user_items(int(u)), "", [], {}, (1.0, 5.0, 1.0)) for u in users]

    def ids(users):
        return [(unit_id_of(int(u), user_items(int(u))), PAIRS_PER_USER) for u in users]

    return UnitSource(np.arange(1, n_users + 1), build, ids)


def llm_units(n_units: int, first_user: int = 1):
    """Units of 10 movies with a short synthetic profile and one grounding line per movie."""
    from rlsim.personas.grounding import WorkUnit

    out = []
    for k in range(n_units):
        u = first_user + k
        ids = [1 + (u * 37 + j * 501) % N_ITEMS for j in range(BATCH)]
        items = [{"item_id": i, "title": f"Film {i}", "year": 1990 + i % 30, "genres": "Drama|Comedy"} for i in ids]
        ground = {i: [(f"Old film {i + 1} (1985)", float(1 + i % 5))] for i in ids}
        out.append(WorkUnit(u, ids, f"A viewer number {u}. Likes quiet dramas and some comedies.", items, ground,
                            (1.0, 5.0, 1.0)))
    return out


# ---------------------------------------------------------------- /proc sampling

class Sampler(threading.Thread):
    """VmRSS / VmHWM of a driver and of the PersonaWorker processes under it, every ``every_s``."""

    def __init__(self, pid: int, shards_dir: Path, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.shards_dir, self.every_s = pid, shards_dir, every_s
        self.stop_ev = threading.Event()
        self.driver_hwm = self.driver_peak = 0.0
        self.workers: dict[int, dict] = {}
        self.timeline: list[tuple[float, int, float, float]] = []  # (t, shards written, driver, workers sum)
        self.t0 = time.monotonic()

    def run(self) -> None:
        n = 0
        while not self.stop_ev.is_set():
            st = proc_status(self.pid)
            if not st:
                break
            self.driver_peak = max(self.driver_peak, st.get("VmRSS", 0.0))
            self.driver_hwm = max(self.driver_hwm, st.get("VmHWM", 0.0))
            wsum = 0.0
            for p in descendants(self.pid):
                if "PersonaWorker" not in proc_cmdline(p):
                    continue
                w = proc_status(p)
                d = self.workers.setdefault(p, {"peak": 0.0, "hwm": 0.0})
                d["peak"] = max(d["peak"], w.get("VmRSS", 0.0))
                d["hwm"] = max(d["hwm"], w.get("VmHWM", 0.0))
                wsum += w.get("VmRSS", 0.0)
            if n % 4 == 0:
                try:
                    shards = sum(1 for f in os.listdir(self.shards_dir) if f.endswith(".parquet"))
                except OSError:
                    shards = 0
                self.timeline.append((round(time.monotonic() - self.t0, 1), shards, round(st.get("VmRSS", 0.0), 1),
                                      round(wsum, 1)))
            n += 1
            self.stop_ev.wait(self.every_s)

    def report(self) -> dict:
        tl = self.timeline
        total = max((s for _, s, _, _ in tl), default=0)
        at = {}
        for q in (0.1, 0.25, 0.5, 0.75, 0.95):
            hit = next((x for x in tl if x[1] >= q * total and x[1] > 0), None)
            if hit:
                at[f"{int(q * 100)}%"] = {"t_s": hit[0], "driver_rss_mb": hit[2], "workers_rss_mb": hit[3]}
        ws = list(self.workers.values())
        return {"driver_peak_rss_mb": round(self.driver_peak, 1), "driver_vmhwm_mb": round(self.driver_hwm, 1),
                "workers": len(ws), "worker_peak_rss_mb": round(max((w["peak"] for w in ws), default=0.0), 1),
                "worker_vmhwm_mb": round(max((w["hwm"] for w in ws), default=0.0), 1),
                "rss_at_progress": at}


# ---------------------------------------------------------------- (a), (b): against the fake server

def steady_rate(times: list[float]) -> tuple[float, float]:
    """(requests/s in the middle 80% of arrivals, requests/s first to last)."""
    t = sorted(times)
    lo, hi = int(0.1 * len(t)), int(0.9 * len(t)) - 1
    mid = (hi - lo) / (t[hi] - t[lo]) if hi > lo and t[hi] > t[lo] else 0.0
    whole = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0
    return mid, whole


def server_run(work: Path, name: str, units, rpm: float, n_workers: int, max_concurrency: int) -> dict:
    import pandas as pd

    from rlsim.personas.backends import BackendSpec
    from rlsim.personas.config import PersonaConfig
    from rlsim.personas.job import run_rating_job
    from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating

    cfg = PersonaConfig(backend="openai", model="fake-model", cache=False, max_retries=8, timeout_s=10.0,
                        backoff_base_s=0.05, backoff_max_s=1.0, n_workers=n_workers, max_concurrency=max_concurrency,
                        rpm=rpm, tpm=1e9, batch_size=BATCH, shard_users=100)
    with FakeOpenAI(FaultConfig(latency_s=LATENCY_S, rpm_limit=rpm)) as srv:
        spec = BackendSpec("openai", "fake-model", srv.base_url, api_key="bench")
        probe: dict = {}
        t0 = time.monotonic()
        s = run_rating_job(units, work / name, spec, cfg, None, use_ray=True, progress=False, probe=probe)
        wall = time.monotonic() - t0
        ok = [r.t for r in srv.log if r.status == 200]
        sent_429 = srv.count(429)
    df = pd.read_parquet(work / name / "ratings.parquet")
    wrong = int((df["rating"].to_numpy() != np.array([expected_rating(u, i) for u, i in
                                                       zip(df["user_id"], df["item_id"])], float)).sum())
    mid, whole = steady_rate(ok)
    return {"actors": n_workers, "in_flight_per_actor": max_concurrency, "limit_rpm": rpm, "requests_ok": len(ok),
            "requests_per_s": round(mid, 2), "ratings_per_s": round(mid * BATCH, 1),
            "achieved_rpm": round(mid * 60, 1), "utilisation": round(mid * 60 / rpm, 4),
            "achieved_rpm_first_to_last": round(whole * 60, 1), "rated": s["rated"], "failed": s["failed"],
            "wrong_ratings": wrong, "server_429_sent": sent_429, "leaked_429": int((df["reason"] == "http_429").sum()),
            "max_in_flight": probe["max_in_flight"], "wall_s": round(wall, 1)}


def phase_actors(work: Path, seconds: float) -> dict:
    out = {}
    per_actor = SWEEP_CONCURRENCY / LATENCY_S  # requests/s one actor can have answered
    for n in (1, 2, 4, 8):
        rate = min(n * per_actor, SWEEP_RPM / 60)
        units = llm_units(int(rate * seconds) + 20, first_user=1)
        out[str(n)] = server_run(work, f"actors{n}", units, SWEEP_RPM, n, SWEEP_CONCURRENCY)
        print(f"  actors {n}: {out[str(n)]['ratings_per_s']} ratings/s "
              f"({out[str(n)]['utilisation']:.2f} of the limit)", flush=True)
    return out


def phase_goal(work: Path, seconds: float) -> dict:
    units = llm_units(int(GOAL_RPM / 60 * seconds), first_user=1)
    r = server_run(work, "goal", units, GOAL_RPM, 2, 16)
    print(f"  goal: {r['achieved_rpm']} of {GOAL_RPM} requests/min, 429 leaked {r['leaked_429']}", flush=True)
    return r


# ---------------------------------------------------------------- (c), (d): 10k / 100k users in a fresh driver

def child(users: int, out: str, result: str) -> None:
    """One rating job in this (fresh) process: its own Ray, offline backend, units built per shard."""
    import ray

    from rlsim.personas.backends import BackendSpec
    from rlsim.personas.config import PersonaConfig
    from rlsim.personas.job import run_rating_job

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rlsim-ray-pscale-", dir="/tmp"))
    cfg = PersonaConfig(backend="offline", shard_users=100)  # 2 actors x 16: a window of 64 units
    probe: dict = {}
    t0 = time.monotonic()
    s = run_rating_job(synthetic_source(users), out, BackendSpec("offline", "offline"), cfg, None, use_ray=True,
                       progress=False, offline_model=FormulaModel(), probe=probe)
    wall = time.monotonic() - t0
    keep = ("pairs", "planned_pairs", "missing_pairs", "rated", "failed", "duplicates", "retried", "resumed",
            "shards", "planned_shards")
    Path(result).write_text(json.dumps({"summary": {k: s[k] for k in keep}, "probe": probe, "wall_s": round(wall, 1),
                                        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                                              1)}))
    ray.shutdown()


def _spawn(users: int, out: Path, result: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, "--child", str(users), str(out), str(result)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def scale_run(work: Path, users: int, name: str) -> dict:
    out, result = work / name, work / f"{name}.json"
    proc = _spawn(users, out, result)
    smp = Sampler(proc.pid, out / "shards")
    smp.start()
    _, err = proc.communicate(timeout=3600)
    smp.stop_ev.set()
    smp.join()
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-3000:])
    r = json.loads(result.read_text())
    return {"users": users, "ratings": r["summary"]["rated"], **smp.report(), "ru_maxrss_mb": r["ru_maxrss_mb"],
            "wall_s": r["wall_s"], "ratings_per_s": round(r["summary"]["rated"] / r["wall_s"], 1),
            "summary": r["summary"], "probe": r["probe"]}


def _kill_job(proc: subprocess.Popen) -> int:
    """SIGKILL the job's process, its group and every process under it (its own Ray), by PID."""
    pids = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()
    return len(pids)


def check_ratings(path: Path, users: int) -> dict:
    import pandas as pd

    df = pd.read_parquet(path, columns=["user_id", "item_id", "rating", "status"])
    u, i = df["user_id"].to_numpy(np.int64), df["item_id"].to_numpy(np.int64)
    key = u * (N_ITEMS + 1) + i
    ok = df["status"].to_numpy() == "ok"
    all_u = np.arange(1, users + 1, dtype=np.int64)
    planned_u = np.repeat(all_u, PAIRS_PER_USER)
    planned_i = (1 + (all_u[:, None] * 37 + np.arange(PAIRS_PER_USER)[None, :] * 501) % N_ITEMS).ravel()
    planned = np.unique(planned_u * (N_ITEMS + 1) + planned_i)
    got_ok = np.unique(key[ok])
    wrong = int((df["rating"].to_numpy()[ok] != FormulaModel().predict_raw(u[ok], i[ok])).sum())
    return {"rows": int(len(df)), "planned_pairs": int(len(planned)),
            "lost": int(len(np.setdiff1d(planned, got_ok, assume_unique=True))),
            "duplicated": int(len(key) - len(np.unique(key))), "unplanned": int(len(np.setdiff1d(got_ok, planned))),
            "wrong_ratings": wrong}


def phase_kill_resume(work: Path, users: int, reference: Path | None, at_share: float = 0.4) -> dict:
    import pandas as pd

    out = work / "killed"
    planned_shards = (users + 99) // 100
    proc = _spawn(users, out, work / "killed_first.json")
    t0 = time.monotonic()
    manifest = out / "manifest.json"
    done = 0
    while proc.poll() is None and time.monotonic() - t0 < 1800:
        try:
            done = len(json.loads(manifest.read_text())["shards"])
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        if done >= at_share * planned_shards:
            break
        time.sleep(0.5)
    if proc.poll() is not None:
        raise RuntimeError("the job ended before the kill: " + proc.stderr.read().decode()[-2000:])
    first_s = time.monotonic() - t0
    files_at_kill = sum(1 for f in os.listdir(out / "shards") if f.endswith(".parquet"))
    killed = _kill_job(proc)
    lines_at_kill = sum(1 for _ in open(out / "journal.jsonl", "rb"))
    res = scale_run(work, users, "killed")  # the rerun resumes in the same folder (a fresh driver and Ray)
    check = check_ratings(out / "ratings.parquet", users)
    same = None
    if reference is not None and reference.is_file():
        a = pd.read_parquet(out / "ratings.parquet")
        b = pd.read_parquet(reference)
        same = bool(a.equals(b))
        del a, b
    lines = sum(1 for _ in open(out / "journal.jsonl", "rb"))
    s, p = res["summary"], res["probe"]
    return {"users": users, "killed_after_s": round(first_s, 1), "shards_in_manifest_at_kill": done,
            "shard_files_at_kill": files_at_kill, "planned_shards": planned_shards, "processes_killed": killed + 1,
            "journal_lines_at_kill": lines_at_kill, "journal_lines_after": lines,
            "units_asked_again": lines - users,
            "resume_wall_s": res["wall_s"], "resumed": s["resumed"], "resumed_shards_from_files": p["final_shards"],
            "shards_rerun": planned_shards - p["final_shards"], "rows_replayed_from_journal": p["replayed_rows"],
            "lost": check["lost"], "duplicated": check["duplicated"], "wrong_ratings": check["wrong_ratings"],
            "rows": check["rows"], "planned_pairs": check["planned_pairs"], "summary_duplicates": s["duplicates"],
            "equals_uninterrupted_run": same, "resume_driver_vmhwm_mb": res["driver_vmhwm_mb"],
            "resume_worker_vmhwm_mb": res["worker_vmhwm_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3, metavar=("USERS", "OUT", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=25.0, help="length of each actors point")
    ap.add_argument("--goal-seconds", type=float, default=60.0, help="length of the 1,200 requests/min run")
    ap.add_argument("--users", type=int, nargs=2, default=[10_000, 100_000], help="the two scale runs")
    ap.add_argument("--skip-server", action="store_true", help="only the scale runs (c, d)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "persona_scale.json"))
    a = ap.parse_args()
    if a.child:
        child(int(a.child[0]), a.child[1], a.child[2])
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import shutil

    t_all = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="rlsim-bench-pscale-"))
    actors = goal = None
    if not a.skip_server:
        import ray

        ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="rlsim-ray-pscale-", dir="/tmp"))
        try:
            print("(a) actors", flush=True)
            actors = phase_actors(work, a.seconds)
            print("(b) 1,200 requests/min", flush=True)
            goal = phase_goal(work, a.goal_seconds)
        finally:
            ray.shutdown()
    small, big = a.users
    print(f"(c) {small} and {big} users x {PAIRS_PER_USER} pairs", flush=True)
    runs = {}
    for n in (small, big):
        runs[n] = scale_run(work, n, f"scale{n}")
        print(f"  {n} users: driver {runs[n]['driver_vmhwm_mb']} MB, workers {runs[n]['worker_vmhwm_mb']} MB, "
              f"{runs[n]['wall_s']} s", flush=True)
    growth = {"driver": round((runs[big]["driver_vmhwm_mb"] - runs[small]["driver_vmhwm_mb"])
                              / runs[small]["driver_vmhwm_mb"], 4),
              "workers": round((runs[big]["worker_vmhwm_mb"] - runs[small]["worker_vmhwm_mb"])
                               / runs[small]["worker_vmhwm_mb"], 4)}
    print(f"(d) kill -9 at {big} users, resume", flush=True)
    kill = phase_kill_resume(work, big, work / f"scale{big}" / "ratings.parquet")
    print(f"  lost {kill['lost']}, duplicated {kill['duplicated']}, resume {kill['resume_wall_s']} s", flush=True)
    result = {
        "actors": {k: v["ratings_per_s"] for k, v in actors.items()} if actors else None,
        "goal_utilisation": goal["utilisation"] if goal else None,
        "goal_leaked_429": goal["leaked_429"] if goal else None,
        "rss_growth": {**growth, "between": f"{small} and {big} users x {PAIRS_PER_USER} pairs",
                       "driver_mb": {str(small): runs[small]["driver_vmhwm_mb"], str(big): runs[big]["driver_vmhwm_mb"]},
                       "worker_mb": {str(small): runs[small]["worker_vmhwm_mb"], str(big): runs[big]["worker_vmhwm_mb"]},
                       "before_fix": BEFORE_FIX},
        "kill_resume": {k: kill[k] for k in ("users", "lost", "duplicated", "wrong_ratings", "resumed_shards_from_files",
                                             "shards_rerun", "resume_wall_s", "equals_uninterrupted_run")},
        "details": {
            "actors": actors, "goal": goal, "scale": {str(k): v for k, v in runs.items()}, "kill_resume": kill,
            "settings": {
                "server": f"tests/fake_openai.py in this process, {LATENCY_S * 1000:.0f} ms latency per request, "
                          "server-side token bucket at the limit (1 s of burst); the job's --rpm is the same limit",
                "actors": f"{SWEEP_CONCURRENCY} requests in flight per actor, batch {BATCH} movies per request, limit "
                          f"{SWEEP_RPM} requests/min; one actor can have {SWEEP_CONCURRENCY / LATENCY_S:.1f} requests/s "
                          f"answered, so the limit ({SWEEP_RPM / 60:.0f}/s) binds from 4 actors on; each point runs "
                          f"~{a.seconds:.0f} s; ratings/s = requests/s in the steady middle 80% of the server's "
                          f"arrivals x {BATCH}",
                "goal": f"{GOAL_RPM} requests/min, {LATENCY_S * 1000:.0f} ms latency, 2 actors x 16 in flight, batch "
                        f"{BATCH}, ~{a.goal_seconds:.0f} s; utilisation = steady middle-80% rate / limit",
                "scale": "offline backend through the Ray pool (2 actors x 16, window 64 units, shard_users 100), "
                         "one unit of 20 movies per user built per shard by a UnitSource (no data layer), answers "
                         "from the fake server's formula; each size in a fresh driver process with its own Ray",
                "rss": "VmHWM (kernel high-water mark) and VmRSS from /proc/<pid>/status of the driver and of each "
                       "ray::PersonaWorker process under it, sampled every 0.5 s by this process; rss_growth = "
                       "(VmHWM at the large run - at the small run) / at the small run (workers: the largest one)",
                "why_offline_for_scale": "100k users x 20 pairs at batch 10 is 200k requests, 2.8 hours at 1,200 "
                                         "requests/min; the offline backend sends the same 2M ratings through the "
                                         "same job machinery in minutes, and the server runs show the rate limit",
                "kill": "SIGKILL of the job's process group and of every process under it (its Ray) once 40% of "
                        "the shards are in the manifest, then the same job again into the same folder",
                "cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            },
            "total_wall_s": round(time.monotonic() - t_all, 1),
        },
    }
    from rlsim.io import write_json

    if a.skip_server and Path(a.out).is_file():  # keep the server phases of an earlier run
        old = json.loads(Path(a.out).read_text())
        for k in ("actors", "goal_utilisation", "goal_leaked_429"):
            result[k] = old.get(k)
        result["details"]["actors"], result["details"]["goal"] = old["details"].get("actors"), old["details"].get("goal")
    write_json(a.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
