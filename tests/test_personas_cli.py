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

SECRET = "sk-cli-secret-never-written"
REPO = Path(__file__).resolve().parents[1]


def data_flags(data_root, cache_root):
    return ["--dataset", "ml-100k", "--split", "u1", "--data-dir", str(data_root), "--cache-dir", str(cache_root),
            "--no-download"]


@pytest.fixture
def server():
    srv = FakeOpenAI(FaultConfig()).start()
    yield srv
    srv.stop()


@pytest.fixture
def no_llm_env(monkeypatch):
    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)


def test_offline_evaluate_beats_user_mean(data_root, cache_root, tmp_path, no_llm_env):
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
def test_llm_profiles_through_fake_server(data_root, cache_root, tmp_path, server, monkeypatch, kind, answer):
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


def test_reward_source_offline_and_llm(ml100k, cache_root, server):
    from rlsim.data import make_split
    from rlsim.personas.backends import BackendSpec
    from rlsim.personas.config import PersonaConfig
    from rlsim.embeddings import item_text_vectors
    from rlsim.personas.source import persona_reward_source

    split = make_split(ml100k, "u1")
    vec = item_text_vectors(ml100k.items, "all-MiniLM-L6-v2", str(cache_root))
    u, i = split.test["user_id"].to_numpy()[:20], split.test["item_id"].to_numpy()[:20]
    off = persona_reward_source(ml100k, split.train, PersonaConfig(), vec)
    assert off.scale == ml100k.scale
    s = off.score(u, i)
    assert s.shape == (20,) and np.isfinite(s).all() and ((s >= 1) & (s <= 5)).all()
    cfg = PersonaConfig(backend="openai", model="fake-model", rpm=60000)
    src = persona_reward_source(ml100k, split.train, cfg, vec, BackendSpec("openai", "fake-model", server.base_url,
                                                                          api_key=SECRET))
    s = src.score(u, i)
    assert (s == [expected_rating(a, b) for a, b in zip(u, i)]).all()
    server.set_faults(p_500=1.0)
    cfg.max_retries = 1
    assert np.isnan(src.score(u[:3], i[:3])).all()  # failures are NaN, never invented


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


def test_evaluate_with_reward_checkpoint(data_root, cache_root, tmp_path, no_llm_env):
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
    assert main(["personas", "evaluate", *data_flags(data_root, cache_root), "--calibrate", "--out", str(out)]) == 0
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
