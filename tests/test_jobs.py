"""`ray job submit` against a private head started by cluster/local_head.sh (own temp dir, ports, token)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.ports import head_ports

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cluster" / "local_head.sh"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def head():
    # Short path: Ray's unix sockets live under the temp dir and have a ~107-character limit.
    temp = Path(tempfile.mkdtemp(prefix="rlh", dir="/tmp"))
    ports = head_ports()
    dash = ports["dashboard_port"]
    args = ["--temp-dir", str(temp), "--port", str(ports["port"]), "--dashboard-port", str(dash), "--num-cpus", "2"]
    r = subprocess.run(["bash", str(SCRIPT), "start", *args], env=_env(), capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode == 0, r.stderr + r.stdout
        exports = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines()
                       if line.startswith("export "))
        yield {"temp": temp, "dash": dash, "exports": exports}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", "--temp-dir", str(temp)], env=_env(), timeout=60)
        st = subprocess.run(["bash", str(SCRIPT), "status", "--temp-dir", str(temp)], env=_env(),
                            capture_output=True, text=True)
        shutil.rmtree(temp, ignore_errors=True)
        assert st.returncode == 3, st.stdout  # nothing of this head is left


def _submit(head, entry: list[str], timeout: int = 300, auth: bool = True) -> subprocess.CompletedProcess:
    env = _env()
    if auth:
        env.update(head["exports"])
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{head['dash']}",
           "--working-dir", str(ROOT), "--", *entry]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _config(tmp_path: Path, data_root: Path, cache_root: Path, stages=None) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["data"].update(data_dir=str(data_root), cache_dir=str(cache_root), download=False)
    if stages:
        cfg["pipeline"]["stages"] = stages
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_head_uses_token_auth(head):
    assert head["exports"]["RAY_AUTH_MODE"] == "token"
    token = Path(head["exports"]["RAY_AUTH_TOKEN_PATH"])
    assert token.is_file() and oct(token.stat().st_mode & 0o777) == "0o600"
    r = _submit(head, ["python", "-c", "print('hello')"], timeout=60, auth=False)
    assert r.returncode != 0
    assert "auth" in (r.stdout + r.stderr).lower()


def test_submit_baselines_job(head, tmp_path, data_root, cache_root):
    cfg = _config(tmp_path, data_root, cache_root)
    out = tmp_path / "out"
    r = _submit(head, ["python", "jobs/baselines.py", str(cfg), "--out", f"file://{out}",
                       "--work-dir", str(tmp_path / "work")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    metrics = json.loads((out / "baselines" / "metrics.json").read_text())
    gate = metrics["baselines"]
    assert set(gate) >= {"global_mean", "user_mean", "bias", "mf"}
    # Fixture ratings have real structure: the bias model beats the global mean.
    assert gate["bias"]["rmse"] < gate["global_mean"]["rmse"]


def test_bad_data_job_fails_with_one_line(head, tmp_path, cache_root):
    cfg = _config(tmp_path, tmp_path / "no-data-here", cache_root)
    r = _submit(head, ["python", "jobs/data.py", str(cfg), "--out", str(tmp_path / "o")], timeout=120)
    assert r.returncode != 0
    assert "rlsim job: error: ml-100k not found" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.slow
def test_submit_small_pipeline(head, tmp_path, data_root, cache_root):
    """The whole pipeline as one `ray job submit`: the stages join the job's Ray instead of starting one."""
    cfg_path = _config(tmp_path, data_root, cache_root)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["reward"].update(epochs=2, decay_epochs=2, dim=16, heads=2)
    cfg["policy"].update(iterations=2, train_batch_size=256, num_epochs=2)
    cfg["policy"]["minibatch_size"] = 64
    cfg["pipeline"]["persona_users"] = 5
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = _submit(head, ["python", "jobs/pipeline.py", str(cfg_path), "--out", f"file://{out}",
                       "--work-dir", str(tmp_path / "work")], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stages"]) >= {"data", "baselines", "reward", "candidates", "policy", "personas", "evaluate"}
    # Two PPO iterations prove the wiring, not learning: the number exists, its size is the slow tests' job.
    assert isinstance(metrics["stages"]["policy"]["gap_closed"], float)
    assert metrics["stages"]["personas"]["persona"]["n"] > 0
    assert (out / "report.html").is_file() and list(out.glob("*.png"))


def test_jobs_start_or_join_ray_the_way_the_cli_does(tmp_path, data_root, cache_root, monkeypatch):
    """jobs/ has no Ray start of its own: it enters rlsim.commands.ray_session.cli_ray with its
    --ray-address (default $RAY_ADDRESS), and stages run inside that session."""
    import contextlib

    sys.path.insert(0, str(ROOT / "jobs"))
    import _common

    from rlsim.commands import ray_session

    seen = []

    @contextlib.contextmanager
    def fake_cli_ray(args, num_cpus=None):
        seen.append(args.ray_address)
        yield None
        seen.append("left")

    monkeypatch.setattr(ray_session, "cli_ray", fake_cli_ray)
    monkeypatch.setattr(_common, "_stages", lambda *a: seen.append("stages") or {"ok": True})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"dataset": "ml-100k", "split": "u1"}}))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    argv = [str(cfg), "--out", str(tmp_path / "out"), "--data-dir", str(data_root), "--cache-dir", str(cache_root)]
    assert _common.run_job(["baselines"], argv) == {"ok": True}
    assert seen == ["127.0.0.1:1", "stages", "left"]
    monkeypatch.delenv("RAY_ADDRESS")
    seen.clear()
    _common.run_job(["baselines"], [*argv, "--ray-address", "auto"])
    assert seen[0] == "auto"


def test_a_job_resolves_its_config_at_the_edge(tmp_path, monkeypatch, capsys):
    """jobs/ resolves the YAML, its flags and the environment as the CLI does (rlsim.run_config):
    an unknown section is one line and exit 2; the job's stages replace pipeline.stages."""
    sys.path.insert(0, str(ROOT / "jobs"))
    import _common

    bad = tmp_path / "bad.yaml"
    bad.write_text("rewrd:\n  epochs: 3\n")
    with pytest.raises(SystemExit) as exc:
        _common.run_job(["baselines"], [str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "unknown config section(s) ['rewrd']" in err

    seen = {}
    monkeypatch.setattr(_common, "_stages", lambda args, stages, run, local: seen.update(run=run, verbose=args.verbose))
    monkeypatch.setattr("rlsim.commands.ray_session.cli_ray", lambda args, num_cpus=None: contextlib.nullcontext())
    monkeypatch.setenv("RLSIM_VERBOSE", "1")
    monkeypatch.setenv("RLSIM_CACHE_DIR", "/env/cache")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"data": {"cache_dir": "/yaml/cache"}, "pipeline": {"stages": ["data"]}}))
    _common.run_job(["baselines", "reward"], [str(good), "--out", str(tmp_path / "o"), "--data-dir", "/flag/data"])
    run = seen["run"]
    assert run.pipeline.stages == ["baselines", "reward"] and seen["verbose"] is True
    assert (run.data.cache_dir, run.data.data_dir) == ("/env/cache", "/flag/data")
