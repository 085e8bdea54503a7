"""Two Ray nodes on this machine (a head and a worker node joining it, each with its own temp dir
and ports, token auth): the pipeline as one `ray job submit`, PPO env runners on both nodes sharing
the one simulator actor, and the loss of the worker node mid-training."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.ports import node_blocks

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cluster" / "local_head.sh"
pytestmark = pytest.mark.slow


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               # The GCS declares a silent node dead after ~3 s instead of ~15 s (Ray's defaults): the
               # node-loss tests wait for that before anything recovers.
               RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="3")
    return env


def _sh(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=_env(), capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def two_node_cluster():
    """One CPU on each node: two env runners (one CPU each) can only run one per node."""
    head_dir = Path(tempfile.mkdtemp(prefix="rlh", dir="/tmp"))
    node_dir = Path(tempfile.mkdtemp(prefix="rln", dir="/tmp"))
    head_port, node_port = node_blocks(2)
    r = _sh("start", "--temp-dir", str(head_dir), "--port", str(head_port), "--dashboard-port", str(head_port + 8),
            "--num-cpus", "1")
    try:
        assert r.returncode == 0, r.stderr + r.stdout
        j = _sh("join", "--head-dir", str(head_dir), "--temp-dir", str(node_dir), "--port", str(node_port),
                "--num-cpus", "1", "--resources", '{"worker_node": 1}')
        assert j.returncode == 0, j.stderr + j.stdout
        exports = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines()
                       if line.startswith("export "))
        yield {"head_dir": head_dir, "node_dir": node_dir, "dash": head_port + 8, "exports": exports}
    finally:
        for d in (node_dir, head_dir):
            _sh("stop", "--temp-dir", str(d), "--now", timeout=60)
            st = _sh("status", "--temp-dir", str(d))
            shutil.rmtree(d, ignore_errors=True)
            assert st.returncode == 3, st.stdout  # nothing of either node is left


@pytest.fixture
def two_nodes():
    with two_node_cluster() as c:
        yield c


def _submit(cluster, entry: list[str], timeout: int = 900, wait: bool = True) -> subprocess.CompletedProcess:
    env = {**_env(), **cluster["exports"]}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
           f"http://127.0.0.1:{cluster['dash']}", "--working-dir", str(ROOT), *([] if wait else ["--no-wait"]),
           "--", *entry]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_STATUS = ("import sys; from ray.job_submission import JobSubmissionClient; "
           "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)")


def submission_id(r: subprocess.CompletedProcess) -> str:
    """The id `ray job submit --no-wait` printed (its output is coloured: the id is followed by an
    ANSI code, which a whitespace split would keep)."""
    m = re.search(r"raysubmit_[A-Za-z0-9]+", r.stdout + r.stderr)
    assert m, (r.stdout + r.stderr)[-2000:]
    return m.group(0)


def job_status(cluster, job: str) -> str:
    """The job's JobStatus value (RUNNING, SUCCEEDED, ...), or "UNKNOWN: <error>" while the dashboard
    cannot say (it may briefly not know a job while a lost node is being declared dead)."""
    env = {**_env(), **cluster["exports"]}
    r = subprocess.run([sys.executable, "-c", _STATUS, f"http://127.0.0.1:{cluster['dash']}", job], env=env,
                       capture_output=True, text=True, timeout=60)
    lines = (r.stdout.strip() or r.stderr.strip()).splitlines()
    return lines[-1] if r.returncode == 0 and lines else "UNKNOWN: " + (lines[-1] if lines else "")


def wait_job(cluster, job: str, timeout_s: float) -> str:
    """Polls until the job ends; its final status, or the last one seen at the deadline."""
    status, deadline = "", time.time() + timeout_s
    while time.time() < deadline:
        status = job_status(cluster, job)
        if status in TERMINAL:
            break
        time.sleep(3)
    return status


def job_logs(cluster, job: str) -> str:
    env = {**_env(), **cluster["exports"]}
    return subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "logs", "--address",
                           f"http://127.0.0.1:{cluster['dash']}", job], env=env, capture_output=True, text=True,
                          timeout=60).stdout


def _config(tmp_path: Path, data_root: Path, cache_root: Path, **policy) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["data"].update(data_dir=str(data_root), cache_dir=str(cache_root), download=False)
    cfg["reward"].update(epochs=2, decay_epochs=2, dim=16, heads=2)
    cfg["candidates"] = {"k": 10}
    cfg["policy"].update({"iterations": 2, "train_batch_size": 256, "minibatch_size": 64, "num_epochs": 2,
                          "num_env_runners": 2, "num_envs_per_env_runner": 8, "users_per_episode": 8, **policy})
    cfg["pipeline"]["persona_users"] = 5
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_pipeline_job_runs_env_runners_on_both_nodes(two_nodes, tmp_path, data_root, cache_root):
    out = tmp_path / "run"
    r = _submit(two_nodes, ["python", "jobs/pipeline.py", str(_config(tmp_path, data_root, cache_root)),
                            "--out", f"file://{out}", "--work-dir", str(tmp_path / "work")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train = json.loads((out / "policy" / "train" / "train_metrics.json").read_text())
    assert len(set(train["env_runner_nodes"])) == 2  # one runner on each node
    sim, acc = train["simulator"], train["reward_accounting"]
    # Both runners stepped against the one simulator actor: every pick shown was a choice (the
    # quickstart pays `liked`), and every watched one was rated there, one request per step each.
    assert sim["requests"] >= 2 and acc["shown"] >= 500 and sim["pairs"] >= acc["asked"] > 0
    assert (out / "report.html").is_file()


@pytest.mark.cluster
@pytest.mark.timeout(1200)
def test_reward_job_trains_one_ray_train_worker_per_node(two_nodes, tmp_path, data_root, cache_root):
    """reward.workers=2 as one `ray job submit`: with one CPU per node, a Ray Train worker runs on each
    node; rank 0's checkpoint (in a temporary folder the nodes of this machine share) reaches the driver."""
    cfg_path = _config(tmp_path, data_root, cache_root)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["reward"].update(workers=2, batch_size=128)
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = _submit(two_nodes, ["python", "jobs/reward.py", str(cfg_path), "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "reward" / "metrics.json").read_text())
    assert [h["workers"] for h in metrics["history"]] == [2, 2]
    assert metrics["reward"]["workers"] == 2 and 0 < metrics["model"]["rmse"] < 2.0
    assert (out / "reward" / "checkpoint" / "model.pt").is_file()


def test_worker_node_lost_mid_training(two_nodes, tmp_path, data_root, cache_root):
    """Killing the worker node kills its env runner; the simulator actor (on the driver's node)
    and the other runner carry on, and the policy run finishes."""
    cfg = _config(tmp_path, data_root, cache_root, iterations=12)
    out = tmp_path / "run"
    r = _submit(two_nodes, ["python", "jobs/pipeline.py", str(cfg), "--out", f"file://{out}",
                            "--work-dir", str(tmp_path / "work")], wait=False, timeout=120)
    assert r.returncode == 0, r.stderr
    job = submission_id(r)
    metrics = tmp_path / "work" / "policy" / "train" / "train_metrics.json"
    deadline = time.time() + 1000  # Ray takes ~30 s to declare the node dead, then RLlib retries its runner
    while time.time() < deadline:  # wait until PPO is iterating, then lose the node
        if metrics.is_file() and len(json.loads(metrics.read_text()).get("iterations", [])) >= 2:
            break
        time.sleep(1)
    assert metrics.is_file(), "PPO never started"
    assert _sh("stop", "--temp-dir", str(two_nodes["node_dir"]), "--now").returncode == 0
    status = wait_job(two_nodes, job, max(60.0, deadline - time.time()))
    assert status == "SUCCEEDED", status + job_logs(two_nodes, job)[-3000:]
    train = json.loads((out / "policy" / "train" / "train_metrics.json").read_text())
    assert len(train["iterations"]) == 12


@pytest.mark.cluster
@pytest.mark.timeout(1500)
def test_persona_pool_spreads_holds_the_limit_and_survives_a_lost_node(two_nodes, tmp_path, data_root, cache_root):
    """Persona workers on both nodes share the one cluster limiter (>= 95% of the limit, no 429
    leaks to the server's own bucket); losing the worker node mid-run loses and duplicates nothing
    (the job finishes, or a resume finishes it)."""
    import pandas as pd

    from rlsim.data import load_movielens, make_split
    from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating

    rpm = 600
    with FakeOpenAI(FaultConfig(latency_s=0.2, rpm_limit=rpm)) as srv:
        out = tmp_path / "rate"
        entry = ["python", "-m", "rlsim.cli", "personas", "rate", "--backend", "openai", "--base-url", srv.base_url,
                 "--model", "fake-model", "--dataset", "ml-100k", "--split", "u1", "--data-dir", str(data_root),
                 "--cache-dir", str(cache_root), "--no-download", "--batch-size", "1", "--shard-users", "4",
                 "--workers", "4", "--rpm", str(rpm), "--no-cache", "--quiet", "--out", str(out)]
        r = _submit(two_nodes, entry, wait=False, timeout=120)
        assert r.returncode == 0, r.stderr
        job = submission_id(r)
        t0 = time.time()
        while len(srv.log) < 150 and time.time() - t0 < 600:  # ~15 s of steady rating first
            time.sleep(0.5)
        steady = sorted(x.t for x in srv.log if x.status == 200)
        assert len(steady) >= 150, "the job never got going"
        # Utilisation before the node is lost, with workers on both nodes (the first seconds are the ramp).
        window = steady[20:]
        achieved = (len(window) - 1) / (window[-1] - window[0]) * 60
        assert achieved >= 0.95 * rpm and achieved <= 1.02 * rpm, achieved
        assert _sh("stop", "--temp-dir", str(two_nodes["node_dir"]), "--now").returncode == 0
        status = wait_job(two_nodes, job, 900)
        resumed = False
        if status != "SUCCEEDED":  # the job died with the node: a rerun resumes it
            r = _submit(two_nodes, entry, timeout=900)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            resumed = True
        assert srv.count(429) == 0  # the server's own bucket never had to refuse
    summary = json.loads((out / "summary.json").read_text())
    if not resumed:
        assert len(set(summary["limits"]["worker_nodes"])) == 2  # the workers were spread over both nodes
    df = pd.read_parquet(out / "ratings.parquet")
    test = make_split(load_movielens("ml-100k", data_dir=data_root, cache_dir=cache_root, download=False), "u1").test
    assert len(df) == len(test) and not df.duplicated(["user_id", "item_id"]).any()  # 0 lost, 0 duplicated
    ok = df[df["status"] == "ok"]
    assert len(ok) == len(df), df["reason"].value_counts().to_dict()
    assert (ok["predicted"].to_numpy() == [expected_rating(u, i) for u, i in zip(ok["user_id"], ok["item_id"])]).all()
