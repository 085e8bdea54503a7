"""`rlsim personas ...` end to end on the generated fixture: offline, and through the fake server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlsim.cli import main
from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating
from tests.ray_local import private_ray

SECRET = "sk-cli-secret-never-written"
REPO = Path(__file__).resolve().parents[2]


def data_flags(data_root, cache_root):
    return ["--dataset", "ml-100k", "--split", "u1", "--data-dir", str(data_root), "--cache-dir", str(cache_root),
            "--no-download"]


@pytest.fixture
def server():
    srv = FakeOpenAI(FaultConfig()).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ray_local():
    """One private Ray for this module; in-process CLI calls join it instead of starting their own."""
    with private_ray("rlc") as ray:
        yield ray


@pytest.fixture
def no_llm_env(monkeypatch):
    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)


def test_offline_evaluate_beats_user_mean(data_root, cache_root, tmp_path, no_llm_env, ray_local):
    out = tmp_path / "off"
    assert main(["personas", "evaluate", *data_flags(data_root, cache_root), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["backend"] == "offline"  # no endpoint configured: the default
    p = m["persona"]
    for k in ("rmse", "mae", "exact", "off_by_1", "five_star_share", "real_five_star_share", "close_match",
              "spearman_per_user", "ndcg@10"):
        assert k in p
    assert set(m["baselines"]) >= {"user_mean", "rounded_user_mean", "bias", "mf"}
    assert m["coverage"] == 1.0 and m["baselines"]["user_mean"]["n"] == p["n"]
    assert p["rmse"] < m["baselines"]["user_mean"]["rmse"]
    assert p["rmse"] < m["baselines"]["rounded_user_mean"]["rmse"]
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert set(np.unique(pairs["predicted"])) <= {1.0, 2.0, 3.0, 4.0, 5.0}  # on the scale, like an LLM
    assert (out / "histogram.png").stat().st_size > 1000


def test_structured_profiles(data_root, cache_root, tmp_path, no_llm_env):
    out = tmp_path / "prof"
    assert main(["personas", "profile", *data_flags(data_root, cache_root), "--users", "5", "--out", str(out)]) == 0
    df = pd.read_parquet(out / "profiles.parquet")
    assert len(df) == 5 and (df["kind"] == "structured").all()
    p = json.loads(df["profile_json"].iloc[0])
    assert {"mean", "std", "histogram", "liked_genres", "favourite_movies", "disliked_movies", "demographics"} <= set(p)
    used = pd.read_parquet(out / "profile_ratings.parquet")
    assert set(used["user_id"]) == set(df["user_id"])


@pytest.mark.parametrize("kind,answer", [
    ("psych", json.dumps({"openness": "high", "conscientiousness": "low", "extraversion": "medium",
                          "agreeableness": "high", "neuroticism": "low", "sensation_seeking": "high",
                          "empathy": "medium", "cognitive_style": "non-linear narratives",
                          "closure_vs_exploration": "exploration", "preferred_genres": ["Drama"],
                          "favourite_movies": ["Film 1"], "disliked_movies": ["Film 2"],
                          "observations": "Seeks novelty."})),
    ("lusifer", json.dumps({"summary": "Enjoys slow dramas."})),
])
def test_llm_profiles_through_fake_server(data_root, cache_root, tmp_path, server, monkeypatch, kind, answer,
                                         ray_local):
    server.set_faults(answer_text=answer)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / kind
    assert main(["personas", "profile", *data_flags(data_root, tmp_path / "c"), "--kind", kind, "--users", "3",
                 "--model", "fake-model", "--quiet", "--out", str(out)]) == 0
    df = pd.read_parquet(out / "profiles.parquet")
    assert len(df) == 3
    if kind == "psych":
        assert len(server.log) == 3 and "openness high" in df["text"].iloc[0]
    else:
        # 60 most recent ratings in batches of 20: one request per started batch.
        used = pd.read_parquet(out / "profile_ratings.parquet").groupby("user_id").size().clip(upper=60)
        assert len(server.log) == int(np.ceil(used / 20).sum())
        assert "Enjoys slow dramas." in df["text"].iloc[0]


def test_dry_run_sends_nothing(data_root, cache_root, tmp_path, server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / "dry"
    assert main(["personas", "rate", *data_flags(data_root, cache_root), "--model", "gpt-4o-mini", "--dry-run",
                 "--users", "10", "--out", str(out)]) == 0
    est = json.loads((out / "dry_run.json").read_text())
    assert est["requests"] > 0 and est["cost_usd"] > 0 and est["prompt_tokens_per_rating"] <= 120
    assert len(server.log) == 0


def test_budget_needs_a_price(data_root, cache_root, tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    rc = main(["personas", "rate", *data_flags(data_root, cache_root), "--model", "unpriced-model",
               "--budget-usd", "1", "--no-ray", "--out", str(tmp_path / "b")])
    assert rc == 2 and "no price" in capsys.readouterr().err


def test_cli_evaluate_through_fake_server_with_ray_pool(data_root, cache_root, tmp_path, server):
    """Subprocess CLI run: Ray actor pool, faults, one worker crash, then a free rerun from the cache."""
    server.set_faults(p_429=0.1, p_500=0.05, p_malformed=0.05, p_missing=0.05, retry_after_s=0.05, seed=2)
    marker = tmp_path / "crash-once"
    marker.write_text("x")
    env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": SECRET,
           "RLSIM_TEST_CRASH_MARKER": str(marker), "PYTHONPATH": str(REPO)}
    cache = tmp_path / "cache"
    import shutil

    shutil.copytree(cache_root, cache, dirs_exist_ok=True)
    out = tmp_path / "llm"
    cmd = [sys.executable, "-m", "rlsim.cli", "personas", "evaluate", "--backend", "openai",
           *data_flags(data_root, cache), "--model", "fake-model", "--users", "8", "--workers", "2",
           "--max-retries", "8", "--rpm", "6000", "--quiet", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not marker.exists()  # a worker did crash (and was restarted)
    m = json.loads((out / "metrics.json").read_text())
    assert m["backend"] == "openai" and m["coverage"] == 1.0
    assert {"rmse", "mae", "exact", "off_by_1", "five_star_share"} <= set(m["persona"])
    assert m["baselines"]["bias"]["n"] == m["persona"]["n"]
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert not pairs.duplicated(["user_id", "item_id"]).any()
    exp = [expected_rating(u, i) for u, i in zip(pairs["user_id"], pairs["item_id"])]
    assert (pairs["predicted"].to_numpy() == np.array(exp, float)).all()
    assert m["usage"]["requests"] > 0 and m["usage"]["prompt_tokens"] > 0
    n = len(server.log)
    # The key is never written anywhere.
    for f in list(out.rglob("*")) + list(cache.rglob("*")):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in r.stdout + r.stderr
    # A rerun in a new folder (in-process this time) is answered from the cache: no request, same ratings.
    out2 = tmp_path / "llm2"
    r = subprocess.run([c if c != str(out) else str(out2) for c in cmd] + ["--no-ray"], env={**env, "RLSIM_TEST_CRASH_MARKER": ""},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(server.log) == n
    p2 = pd.read_parquet(out2 / "pairs.parquet")
    pd.testing.assert_series_equal(p2["predicted"], pairs["predicted"])


def test_evaluate_with_reward_checkpoint(data_root, cache_root, tmp_path, no_llm_env, ray_local):
    common = data_flags(data_root, cache_root)
    run = tmp_path / "reward"
    assert main(["reward", "train", *common, "--out", str(run), "--epochs", "1", "--dim", "16",
                 "--batch-size", "256"]) == 0
    out = tmp_path / "ev"
    assert main(["personas", "evaluate", *common, "--users", "20", "--reward-checkpoint", str(run / "checkpoint"),
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["reward_model"]["n"] == m["persona"]["n"] == m["baselines"]["bias"]["n"]
    assert np.isfinite(m["reward_model"]["rmse"])
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert pairs["reward_model"].notna().all() and pairs["user_id"].nunique() == 20


def test_calibrated_offline_ratings_follow_user_distribution(data_root, cache_root, tmp_path, no_llm_env):
    out = tmp_path / "cal"
    assert main(["personas", "evaluate", *data_flags(data_root, cache_root), "--calibrate", "--no-ray",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert m["calibrated"] is True and "predicted_uncalibrated" in pairs
    assert set(np.unique(pairs["predicted"])) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    # Each user's answers move towards the shape of their own training ratings.
    from rlsim.data import load_movielens, make_split
    from rlsim.metrics import histogram_distance

    ds = load_movielens("ml-100k", data_dir=data_root, cache_dir=cache_root, download=False)
    train = make_split(ds, "u1").train
    hist = {u: g["rating"].to_numpy() for u, g in train.groupby("user_id")}
    tv = {c: np.mean([histogram_distance(hist[u], g[c], ds.scale)["total_variation"]
                      for u, g in pairs.groupby("user_id") if len(g) >= 5])
          for c in ("predicted", "predicted_uncalibrated")}
    assert tv["predicted"] < tv["predicted_uncalibrated"]


# ---------------------------------------------------------------- budget, dry run and validation at the CLI

def _llm_env(monkeypatch, server):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    for k in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("kind,requests", [("psych", 3), ("lusifer", None)])
def test_profile_dry_run_sends_nothing(data_root, cache_root, tmp_path, server, monkeypatch, kind, requests):
    _llm_env(monkeypatch, server)
    out = tmp_path / "dry"
    assert main(["personas", "profile", *data_flags(data_root, cache_root), "--kind", kind, "--users", "3",
                 "--model", "fake-model", "--dry-run", "--quiet", "--out", str(out)]) == 0
    est = json.loads((out / "dry_run.json").read_text())
    assert est["requests"] == (requests or est["requests"]) and est["requests"] >= 3
    assert est["prompt_tokens"] > 0 and est["cost_usd"] > 0
    assert len(server.log) == 0 and not (out / "profiles.parquet").exists()


def test_profile_budget_needs_a_price(data_root, cache_root, tmp_path, server, monkeypatch, capsys):
    _llm_env(monkeypatch, server)
    rc = main(["personas", "profile", *data_flags(data_root, cache_root), "--kind", "psych", "--users", "2",
               "--model", "unpriced-model", "--budget-usd", "1", "--no-ray", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "no price" in err and len(server.log) == 0


@pytest.mark.parametrize("verb,flags,what", [
    ("rate", ["--rpm", "0"], "rpm"),
    ("rate", ["--tpm", "-1"], "tpm"),
    ("evaluate", ["--workers", "0"], "workers"),
    ("evaluate", ["--batch-size", "0"], "batch_size"),
    ("rate", ["--timeout", "0"], "timeout"),
    ("profile", ["--kind", "psych", "--concurrency", "0"], "concurrency"),
    ("rate", ["--max-retries", "-1"], "max_retries"),
])
def test_bad_persona_settings_are_one_line_errors(data_root, cache_root, tmp_path, server, monkeypatch, capsys,
                                                  verb, flags, what):
    _llm_env(monkeypatch, server)
    rc = main(["personas", verb, *data_flags(data_root, cache_root), "--backend", "openai", "--model", "fake-model",
               "--no-ray", *flags, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("rlsim: error:") and "\n" not in err and what in err
    assert len(server.log) == 0


# ---------------------------------------------------------------- profiles: identity, split, honest fallbacks

def test_resume_with_other_profiles_is_refused(data_root, cache_root, tmp_path, server, monkeypatch, capsys):
    _llm_env(monkeypatch, server)
    common = [*data_flags(data_root, cache_root), "--users", "3"]
    a = tmp_path / "profA"
    assert main(["personas", "profile", *common, "--out", str(a)]) == 0
    b = tmp_path / "profB"
    import shutil

    shutil.copytree(a, b)
    df = pd.read_parquet(b / "profiles.parquet")
    df["text"] = df["text"] + " Falls asleep in long films."
    df.to_parquet(b / "profiles.parquet", index=False)
    rate = ["personas", "rate", *common, "--model", "fake-model", "--no-ray", "--quiet", "--out", str(tmp_path / "r")]
    assert main(rate + ["--profiles", str(a)]) == 0
    capsys.readouterr()
    assert main(rate + ["--profiles", str(b)]) == 2
    assert "profiles" in capsys.readouterr().err
    assert main(rate + ["--profiles", str(a)]) == 0  # the same profiles resume


def test_profiles_of_another_split_are_refused(data_root, cache_root, tmp_path, server, monkeypatch, capsys):
    _llm_env(monkeypatch, server)
    prof = tmp_path / "prof_u2"
    assert main(["personas", "profile", "--dataset", "ml-100k", "--split", "u2", "--data-dir", str(data_root),
                 "--cache-dir", str(cache_root), "--no-download", "--users", "3", "--out", str(prof)]) == 0
    meta = json.loads((prof / "profiles.json").read_text())
    assert meta["dataset"] == "ml-100k" and meta["split"] == "u2" and meta["split_fingerprint"]
    rc = main(["personas", "rate", *data_flags(data_root, cache_root), "--users", "3", "--model", "fake-model",
               "--no-ray", "--profiles", str(prof), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "split" in err and len(server.log) == 0
    # The same split name with another hold-out (temporal, other test fraction) is caught by its fingerprint.
    meta.update(split="u1", split_fingerprint="0" * 64)
    (prof / "profiles.json").write_text(json.dumps(meta))
    rc = main(["personas", "rate", *data_flags(data_root, cache_root), "--users", "3", "--model", "fake-model",
               "--no-ray", "--profiles", str(prof), "--out", str(tmp_path / "r2")])
    assert rc == 2 and "another 'u1' split" in capsys.readouterr().err


def test_failed_psych_profiles_are_counted_not_hidden(data_root, cache_root, tmp_path, server, monkeypatch, capsys):
    _llm_env(monkeypatch, server)
    server.set_faults(answer_text="I am not able to profile people.")
    out = tmp_path / "psych"
    assert main(["personas", "profile", *data_flags(data_root, tmp_path / "c"), "--kind", "psych", "--users", "3",
                 "--model", "fake-model", "--max-retries", "0", "--no-ray", "--quiet", "--out", str(out)]) == 0
    meta = json.loads((out / "profiles.json").read_text())
    assert meta["kind"] == "psych" and meta["fallbacks"] == 3
    assert meta["fallback_reasons"] == {"malformed_json": 3} and meta["built"] == {"structured": 3}
    df = pd.read_parquet(out / "profiles.parquet")
    assert (df["kind"] == "structured").all() and (df["asked_kind"] == "psych").all()
    assert (df["status"] == "fallback").all()
    assert "3 of 3 psych profiles failed" in capsys.readouterr().err


def test_failed_lusifer_batches_are_recorded(data_root, cache_root, tmp_path, server, monkeypatch):
    _llm_env(monkeypatch, server)
    server.set_faults(answer_text=json.dumps({"summary": "Likes dramas."}), p_500=0.5, seed=4)
    out = tmp_path / "lus"
    assert main(["personas", "profile", *data_flags(data_root, tmp_path / "c"), "--kind", "lusifer", "--users", "4",
                 "--model", "fake-model", "--max-retries", "0", "--no-ray", "--quiet", "--out", str(out)]) == 0
    meta = json.loads((out / "profiles.json").read_text())
    n500 = server.count(500)
    assert n500 > 0
    assert meta["lusifer_failed_batches"] == n500 and meta["lusifer_failed_batch_reasons"] == {"http_500": n500}
    assert meta["lusifer_batches"] == len(server.log)
    df = pd.read_parquet(out / "profiles.parquet")
    assert int(df["failed_batches"].sum()) == n500
    for pj, kind in zip(df["profile_json"], df["kind"]):
        p = json.loads(pj)
        p = p.get("lusifer", p)
        assert p["ratings_used"] <= p["ratings_offered"]
        if kind == "lusifer":
            assert p["failed_batches"] < p["batches"]


# ---------------------------------------------------------------- Ray: the pool for the offline persona, joining

def test_evaluate_stage_runs_offline_through_the_ray_pool(data_root, cache_root, tmp_path, no_llm_env, ray_local):
    from rlsim.config import DataConfig
    from rlsim.personas.config import PersonaConfig
    from rlsim.personas.run import evaluate_stage

    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=str(data_root), cache_dir=str(cache_root),
                      download=False)
    cfg = PersonaConfig(backend="offline", shard_users=4)
    m = evaluate_stage(dcfg, cfg, tmp_path / "ray", users=10, use_ray=True, progress=False)
    manifest = json.loads((tmp_path / "ray" / "job" / "manifest.json").read_text())
    assert len(manifest["shards"]) == len(manifest["plan"]) == 3
    assert m["coverage"] == 1.0 and m["usage"]["requests"] == 0 and m["users"] == 10
    assert (tmp_path / "ray" / "histogram.png").is_file() and (tmp_path / "ray" / "pairs.parquet").is_file()
    local = evaluate_stage(dcfg, cfg, tmp_path / "local", users=10, use_ray=False, progress=False)
    a = pd.read_parquet(tmp_path / "ray" / "pairs.parquet")
    b = pd.read_parquet(tmp_path / "local" / "pairs.parquet")
    pd.testing.assert_frame_equal(a[["user_id", "item_id", "predicted", "predicted_raw"]],
                                  b[["user_id", "item_id", "predicted", "predicted_raw"]])
    assert m["persona"]["rmse"] == local["persona"]["rmse"]
    # The same answers as the fitted offline persona itself.
    from rlsim.data import load_split
    from rlsim.embeddings import item_text_vectors
    from rlsim.personas.source import offline_persona

    ds, split = load_split(dcfg)
    model = offline_persona(ds, split.train, cfg, item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir))
    assert (model.predict(a["user_id"], a["item_id"]) == a["predicted"].to_numpy()).all()


def test_cli_joins_a_running_cluster_and_its_limiter(data_root, cache_root, tmp_path, server, ray_local):
    from rlsim.personas.limiter import limiter_name
    from rlsim.personas.limiter_actor import get_limiter

    ray = ray_local
    env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": SECRET, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "rlsim.cli", "personas", "rate", "--backend", "openai",
           *data_flags(data_root, cache_root), "--model", "fake-model", "--users", "2", "--rpm", "6000", "--quiet",
           "--ray-address", ray.get_runtime_context().gcs_address, "--out", str(tmp_path / "r")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    name = limiter_name(server.base_url, "fake-model")
    assert summary["limits"]["limiter"] == name and summary["limits"]["scope"] == "cluster"
    st = ray.get(get_limiter(name).stats.remote())  # the limiter outlives the job, on the cluster it joined
    assert st["granted"] >= summary["usage"]["requests"] > 0


# ---------------------------------------------------------------- every flag listed in --help is used

FLAG_VALUES = {
    "--dataset": "ml-latest-small", "--split": "u2", "--data-dir": "/d", "--cache-dir": "/c", "--overviews": "/o.csv",
    "--seed": "7", "--text-model": "other-model", "--backend": "tinytroupe", "--model": "gpt-4o",
    "--base-url": "http://127.0.0.1:2/v1", "--api-version": "2024-10-21", "--users": "3", "--batch-size": "3",
    "--k-similar": "1", "--workers": "3", "--shard-users": "3", "--profiles": "/p", "--concurrency": "3",
    "--rpm": "7", "--tpm": "7", "--max-retries": "1", "--timeout": "3", "--budget-usd": "2",
    "--ray-address": "127.0.0.1:1", "--reward-checkpoint": "/ck", "--ndcg-k": "5", "--kind": "lusifer",
    "--out": "OTHER",
    "--lessons": "/l", "--demos": "7", "--chunk": "2", "--history": "3", "--pair-questions": "2", "--whatif": "2",
    "--max-lessons": "2", "--validation-frac": "0.3",
}
BASE = {"profile": ["--kind", "psych", "--backend", "openai", "--base-url", "http://127.0.0.1:1/v1"],
        "rate": [], "evaluate": [], "align": ["--backend", "openai", "--base-url", "http://127.0.0.1:1/v1"]}
# PersonaConfig fields a stage never reads: a flag that only changes these is not used by that command.
IGNORED_FIELDS = {"profile": {"n_workers", "batch_size", "k_similar", "shard_users", "calibrate", "offline"},
                  "rate": set(), "evaluate": set(), "align": {"calibrate", "offline"}}


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix: obj}


def _help_flags(verb, capsys) -> list[str]:
    import re

    with pytest.raises(SystemExit):
        main(["personas", verb, "--help"])
    text = capsys.readouterr().out
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text)) - {"--help"})


@pytest.mark.parametrize("verb", ["profile", "rate", "evaluate", "align"])
def test_every_flag_in_help_is_used(verb, tmp_path, monkeypatch, capsys):
    import dataclasses
    from contextlib import nullcontext

    from rlsim.commands import personas as cmd
    from rlsim.personas import run

    for k in ("OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "RAY_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    calls = []

    def norm(v):
        if isinstance(v, pd.DataFrame):
            return ("frame", v.to_csv())
        if dataclasses.is_dataclass(v):
            return dataclasses.asdict(v)
        return str(v) if isinstance(v, Path) else v

    def fake(name):
        def stage(*a, **kw):
            calls.append((name, [norm(x) for x in a], {k: norm(v) for k, v in kw.items()}))
            return {"users": 1, "persona": {}, "coverage": 1.0, "baselines": {}, "ratings": "r", "notes": []}
        return stage

    for name in ("build_profiles_stage", "rate_stage", "evaluate_stage", "align_stage"):
        monkeypatch.setattr(run, name, fake(name))
    monkeypatch.setattr(cmd, "ray_for_personas", lambda args, cfg: (calls.append(("ray", args.ray_address)),
                                                                     nullcontext())[1])
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"user_id": [1], "item_id": [2]}).to_csv(pairs, index=False)
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("personas:\n  max_retries: 9\n")
    values = {**FLAG_VALUES, "--pairs": str(pairs), "--config": str(yaml_cfg)}

    def call(extra):
        calls.clear()
        argv = ["personas", verb, *BASE[verb], "--out", str(tmp_path / "out"), *extra]
        assert main(argv) == 0, capsys.readouterr().err
        capsys.readouterr()
        return list(calls)

    flags = _help_flags(verb, capsys)
    assert "--out" in flags and "--quiet" in flags and ("--ray-address" in flags)
    base = call([])
    unused = []
    for f in flags:
        parser_action = None
        import argparse

        from rlsim.cli import build_parser

        sub = build_parser()._subparsers._group_actions[0].choices["personas"]
        parser_action = sub._subparsers._group_actions[0].choices[verb]._option_string_actions[f]
        if isinstance(parser_action, (argparse._StoreTrueAction,)):
            extra = [f]
        else:
            assert f in values, f"no test value for {f}: add one to FLAG_VALUES"
            v = values[f]
            extra = [f, str(tmp_path / v)] if f == "--out" else [f, v]
        a, b = _flatten(base), _flatten(call(extra))
        changed = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
        # PersonaConfig is the second positional argument of every stage: ignore fields it never reads.
        changed = {k for k in changed if not any(f".1.1.{x}." in f".{k}" for x in IGNORED_FIELDS[verb])}
        if not changed:
            unused.append(f)
    assert not unused, f"`rlsim personas {verb}` lists flags it ignores: {unused}"


def test_seed_reaches_the_persona_config(monkeypatch):
    from rlsim.cli import build_parser, run_config
    from rlsim.run_config import personas_for

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    args = build_parser().parse_args(["personas", "rate", "--seed", "7", "--out", "x"])
    assert personas_for(run_config(args), "pool").seed == 7
    args = build_parser().parse_args(["personas", "profile", "--seed", "3", "--out", "x"])
    assert personas_for(run_config(args), "pool").seed == 3
