"""Two Ray nodes on this machine, one lost mid-run -> bench/results/cluster.json.

A head and a worker node (cluster/local_head.sh, one CPU each, token auth) run `rlsim personas
rate` as one `ray job submit` against the fake OpenAI server (tests/fake_openai.py, 200 ms latency,
server-side token bucket at the limit). Persona workers on both nodes share the cluster's one
limiter. Once the job is rating steadily, the worker node is killed (SIGKILL of every
process of it: cluster/local_head.sh stop --now); the job finishes, or a rerun of the same job resumes it. Measured: the request rate
the limiter achieved before the loss (steady window, as a share of the limit), 429s the server had
to send, and the ratings lost or duplicated against the split's test pairs, every one checked
against the server's rating formula.

Data: real ML-100K u1 (a seeded sample of --users users) when RLSIM_DATA_DIR has it, else the test
fixtures' generated ml-100k.

Run: python bench/cluster.py  (~6 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rating_accounting(test, ratings, users: int | None, seed: int = 0) -> dict:
    """lost / duplicated ratings of the job against EVERY planned pair: the test pairs of the users
    the job was asked to rate (the same seeded sample `rlsim personas rate --users` draws), whether or
    not a user appears in the output (a user lost with a node has no row at all)."""
    from rlsim.personas.stages_common import sample_users

    chosen = sample_users(test["user_id"], users, seed)
    planned_df = test[test["user_id"].isin(chosen)]
    planned = set(zip(planned_df["user_id"].astype(int), planned_df["item_id"].astype(int)))
    got = list(zip(ratings["user_id"].astype(int), ratings["item_id"].astype(int)))
    have = set(got)
    return {"planned": len(planned), "lost_ratings": len(planned - have), "duplicated_ratings": len(got) - len(have),
            "users_planned": int(len(chosen)), "users_missing": int(len(set(map(int, chosen)) - {u for u, _ in have})),
            "unplanned_ratings": len(have - planned)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rpm", type=int, default=600)
    ap.add_argument("--users", type=int, default=60, help="users of ML-100K u1 rated (real data only)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cluster.json"))
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pandas as pd

    from rlsim.config import DataConfig
    from rlsim.data import load_movielens, make_split
    from rlsim.io import write_json
    from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating
    from tests.test_cluster import _sh, _submit, submission_id, two_node_cluster, wait_job

    work = Path(tempfile.mkdtemp(prefix="rlsim-bench-cluster-"))
    real = os.environ.get("RLSIM_DATA_DIR")
    if real and (Path(real) / "ml-100k" / "u.data").is_file():
        data_dir, source, users = Path(real), "ML-100K u1 (real)", ["--users", str(a.users)]
    else:
        from tests.fixtures import write_ml100k

        data_dir, source, users = work / "data", "generated ml-100k fixture (u1)", []
        write_ml100k(data_dir)
    cache = work / "cache"
    t_all = time.monotonic()
    with two_node_cluster() as cluster, FakeOpenAI(FaultConfig(latency_s=0.2, rpm_limit=a.rpm)) as srv:
        out = work / "rate"
        entry = ["python", "-m", "rlsim.cli", "personas", "rate", "--backend", "openai", "--base-url", srv.base_url,
                 "--model", "fake-model", "--dataset", "ml-100k", "--split", "u1", "--data-dir", str(data_dir),
                 "--cache-dir", str(cache), "--no-download", *users, "--batch-size", "1", "--shard-users", "4",
                 "--workers", "4", "--rpm", str(a.rpm), "--no-cache", "--quiet", "--out", str(out)]
        r = _submit(cluster, entry, wait=False, timeout=120)
        if r.returncode != 0:
            raise SystemExit(f"ray job submit failed: {r.stderr.strip().splitlines()[-1:]}")
        job = submission_id(r)
        print(f"submitted {job}; rating until 300 requests are answered", flush=True)
        t0 = time.time()
        while sum(x.status == 200 for x in srv.log) < 300 and time.time() - t0 < 900:
            time.sleep(0.5)
        steady = sorted(x.t for x in srv.log if x.status == 200)
        if len(steady) < 300:
            raise SystemExit(f"the job answered only {len(steady)} requests in 900 s")
        window = steady[20:]  # the first requests are the ramp: workers starting on both nodes
        achieved_rpm = (len(window) - 1) / (window[-1] - window[0]) * 60
        print(f"steady rate {achieved_rpm:.1f} requests/min of {a.rpm}; stopping the worker node", flush=True)
        t_kill = time.time()
        assert _sh("stop", "--temp-dir", str(cluster["node_dir"]), "--now").returncode == 0
        first_job = wait_job(cluster, job, 900)
        resumed = first_job != "SUCCEEDED"
        if resumed:  # the job died with the node: the same job again resumes it
            print(f"the job ended {first_job}; resubmitting it", flush=True)
            r = _submit(cluster, entry, timeout=1200)
            if r.returncode != 0:
                raise SystemExit(f"the resumed job failed: {(r.stdout + r.stderr).strip().splitlines()[-1:]}")
        finish_s = time.time() - t_kill
        server_429 = srv.count(429)
        requests = len(srv.log)
    summary = json.loads((out / "summary.json").read_text())
    df = pd.read_parquet(out / "ratings.parquet")
    test = make_split(load_movielens("ml-100k", data_dir=data_dir, cache_dir=cache, download=False), "u1").test
    # The job runs with the default --seed: the planned users are that seeded sample.
    acc = rating_accounting(test, df, a.users if users else None, seed=DataConfig().seed)
    ok = df[df["status"] == "ok"]
    wrong = int((ok["predicted"].to_numpy() != [expected_rating(u, i) for u, i in
                                                zip(ok["user_id"], ok["item_id"])]).sum())
    result = {
        "two_node": {
            "rate_limit_utilisation": round(achieved_rpm / a.rpm, 4),
            "lost_ratings": acc["lost_ratings"],
            "duplicated_ratings": acc["duplicated_ratings"],
            "node_killed": True,
        },
        "details": {
            "data": source, "pairs": acc["planned"], "users_planned": acc["users_planned"],
            "users_missing_from_output": acc["users_missing"], "unplanned_ratings": acc["unplanned_ratings"],
            "rated_ok": len(ok), "failed": int((df["status"] != "ok").sum()),
            "wrong_ratings": wrong, "limit_rpm": a.rpm, "achieved_rpm_before_loss": round(achieved_rpm, 1),
            "server_429": server_429, "requests_to_server": requests,
            "job_after_node_loss": first_job, "resumed_by_rerun": resumed,
            "seconds_from_node_loss_to_all_rated": round(finish_s, 1),
            "worker_nodes_of_last_job": len(set(summary.get("limits", {}).get("worker_nodes", []))),
            "setting": "head + worker node on one machine (cluster/local_head.sh, 1 CPU each), 4 persona "
                       "workers, batch 1, fake server at 200 ms with a server-side bucket at the limit; the "
                       "worker node's processes killed (SIGKILL) after 300 answered requests",
            "total_wall_s": round(time.monotonic() - t_all, 1),
        },
    }
    write_json(a.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
