"""Persona engine against the fake OpenAI server: validation, retries, failures, cache, budget, resume."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import numpy as np
import pandas as pd
import pytest

from rlsim.data.schema import RatingScale
from rlsim.personas.backends import BackendSpec
from rlsim.personas.cache import ResponseCache, request_key
from rlsim.personas.calibrate import quantile_map
from rlsim.personas.config import PersonaConfig
from rlsim.personas.grounding import WorkUnit
from rlsim.personas.limiter import LocalLimiter, RateLimiter
from rlsim.personas.pool import RatingEngine, dry_run, rate_units_local, run_rating_job
from rlsim.personas.validate import parse_ratings
from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating

SCALE = RatingScale(1.0, 5.0, 1.0)
SECRET = "sk-test-do-not-leak-123"


@pytest.fixture
def server():
    srv = FakeOpenAI(FaultConfig()).start()
    yield srv
    srv.stop()


def make_units(n_users=4, n_items=12, batch=5) -> list[WorkUnit]:
    units = []
    for u in range(1, n_users + 1):
        ids = [100 + 3 * j + u for j in range(n_items)]
        for s in range(0, n_items, batch):
            b = ids[s:s + batch]
            items = [{"item_id": i, "title": f"Film {i}", "year": 1990, "genres": "Drama"} for i in b]
            ground = {i: [(f"Old film {i - 1} (1980)", 4.0)] for i in b}
            units.append(WorkUnit(u, b, f"A viewer number {u}.", items, ground, (1.0, 5.0, 1.0)))
    return units


def cfg_for(**kw) -> PersonaConfig:
    base = dict(backend="openai", model="fake-model", max_retries=4, timeout_s=5.0, backoff_base_s=0.01,
                backoff_max_s=0.05, rpm=60000, tpm=1e9, max_concurrency=8, n_workers=1, shard_users=1)
    base.update(kw)
    return PersonaConfig(**base)


def engine_for(srv, cfg, cache=None, budget=None) -> RatingEngine:
    spec = BackendSpec("openai", cfg.model, srv.base_url, timeout_s=cfg.timeout_s, api_key=SECRET)
    return RatingEngine(spec, cfg, LocalLimiter(RateLimiter(cfg.rpm, cfg.tpm, budget)), cache)


def run_units(engine, units, concurrency=8):
    res = asyncio.run(rate_units_local(engine, units, concurrency))
    rows = pd.DataFrame([r for x in res for r in x["rows"]])
    return rows, res


def assert_correct(rows):
    ok = rows[rows["status"] == "ok"]
    exp = [expected_rating(u, i) for u, i in zip(ok["user_id"], ok["item_id"])]
    assert (ok["rating"].to_numpy() == np.array(exp, float)).all()


# ---------------------------------------------------------------- validation

def test_parse_plain_fenced_and_prose():
    p = parse_ratings('{"1": 4, "2": 5}', [1, 2], SCALE)
    assert p.ratings == {1: 4.0, 2: 5.0} and p.complete and p.parse == "json"
    p = parse_ratings('Here:\n```json\n{"1": 2, "2": "3"}\n```', [1, 2], SCALE)
    assert p.ratings == {1: 2.0, 2: 3.0} and p.parse == "fenced"
    p = parse_ratings('Sure! {"ratings": {"1": 1, "2": 2}} hope it helps', [1, 2], SCALE)
    assert p.ratings == {1: 1.0, 2: 2.0}


def test_parse_repairs_and_flags():
    p = parse_ratings('{"1": 6, "2": 3.6, "3": 11, "4": "great", "99": 4}', [1, 2, 3, 4, 5], SCALE)
    assert p.ratings == {1: 5.0, 2: 4.0}  # clipped and snapped
    assert sorted(p.repaired) == [1, 2]
    assert set(p.invalid) == {3, 4} and p.missing == [5] and p.unexpected_ids == [99]
    assert not p.complete


def test_parse_truncated_and_garbage():
    p = parse_ratings('{"10": 4, "11": 2, "1', [10, 11, 12], SCALE)
    assert p.ratings == {10: 4.0, 11: 2.0} and p.missing == [12] and p.parse == "regex"
    p = parse_ratings("I cannot rate movies.", [10], SCALE)
    assert p.parse == "failed" and p.missing == [10]


def test_half_star_scale():
    half = RatingScale(0.5, 5.0, 0.5)
    p = parse_ratings('{"1": 3.7, "2": 0.2}', [1, 2], half)
    assert p.ratings == {1: 3.5, 2: 0.5}


# ---------------------------------------------------------------- engine + server

def test_ratings_reach_the_right_user_and_item(server):
    units = make_units()
    rows, res = run_units(engine_for(server, cfg_for()), units)
    assert len(rows) == 4 * 12 and (rows["status"] == "ok").all()
    assert_correct(rows)
    assert all(r.has_schema for r in server.log) and len(server.log) == len(units)
    assert sum(x["usage"]["prompt_tokens"] for x in res) > 0


def test_retries_recover_from_every_fault(server):
    # Half of all answers are faulty; 16 tries leave ~1e-3 odds that any of the 72 items fails.
    server.set_faults(p_429=0.1, p_500=0.05, p_truncated=0.05, p_malformed=0.05, p_wrong_ids=0.05,
                      p_missing=0.1, p_out_of_scale=0.05, p_fenced=0.05, retry_after_s=0.05, seed=3)
    units = make_units(n_users=6)
    rows, res = run_units(engine_for(server, cfg_for(max_retries=15)), units)
    assert (rows["status"] == "ok").all(), rows[rows.status != "ok"]
    assert_correct(rows)
    assert sum(1 for r in server.log if r.fault) >= 5
    assert rows["attempts"].max() > 1
    errors = {}
    for x in res:
        for k, v in x["usage"]["errors"].items():
            errors[k] = errors.get(k, 0) + v
    assert errors.get("http_429", 0) == server.count(429)


def test_timeouts_are_retried(server):
    server.set_faults(p_timeout=0.4, timeout_sleep_s=1.5, seed=1)
    rows, res = run_units(engine_for(server, cfg_for(timeout_s=0.4, max_retries=8)), make_units(2, 6, 3))
    assert (rows["status"] == "ok").all()
    assert_correct(rows)
    assert sum(x["usage"]["errors"].get("timeout", 0) for x in res) > 0


@pytest.mark.parametrize("faults,reason", [
    ({"p_500": 1.0}, "http_500"),
    ({"p_wrong_ids": 1.0}, "missing_from_answer"),
    ({"p_malformed": 1.0, "answer_text": "no JSON here"}, "malformed_json"),
])
def test_failures_are_recorded_with_reasons(server, faults, reason):
    server.set_faults(**faults)
    cfg = cfg_for(max_retries=2)
    rows, _ = run_units(engine_for(server, cfg), make_units(2, 4, 4))
    assert len(rows) == 8 and (rows["status"] == "failed").all()
    assert (rows["reason"] == reason).all()
    assert (rows["attempts"] == cfg.max_retries + 1).all()
    assert rows["rating"].isna().all()


def test_permanent_errors_are_not_retried(server):
    cfg = cfg_for()
    spec = BackendSpec("openai", "fake-model", server.url + "/nope/v1", timeout_s=2, api_key=SECRET)
    eng = RatingEngine(spec, cfg, LocalLimiter(RateLimiter(cfg.rpm, cfg.tpm)))
    rows, _ = run_units(eng, make_units(1, 3, 3))
    assert (rows["reason"] == "http_404").all() and (rows["attempts"] == 1).all()


def test_partial_answers_ask_again_for_the_rest(server):
    server.set_faults(p_missing=1.0)  # every answer drops its first movie
    rows, _ = run_units(engine_for(server, cfg_for(max_retries=10)), make_units(1, 4, 4))
    assert (rows["status"] == "ok").all()
    assert_correct(rows)
    # The retry only carries the movie still missing.
    assert [len(r.item_ids) for r in server.log] == [4, 1]


def test_azure_deployment_route(server):
    cfg = cfg_for()
    spec = BackendSpec("openai", "my-deployment", server.url, api_version="2024-10-21", api_key=SECRET)
    eng = RatingEngine(spec, cfg, LocalLimiter(RateLimiter(cfg.rpm, cfg.tpm)))
    rows, _ = run_units(eng, make_units(1, 3, 3))
    assert (rows["status"] == "ok").all()
    assert server.log[0].path == "/openai/deployments/my-deployment/chat/completions"


# ---------------------------------------------------------------- cache

def test_cache_hit_makes_no_request_and_replays_exactly(server, tmp_path):
    server.set_faults(p_missing=0.3, p_truncated=0.2, seed=5)
    cache = ResponseCache(tmp_path / "c.sqlite")
    units = make_units(3, 8, 4)
    rows1, _ = run_units(engine_for(server, cfg_for(max_retries=8), cache), units)
    n = len(server.log)
    assert n >= len(units)
    rows2, res2 = run_units(engine_for(server, cfg_for(max_retries=8), cache), units)
    assert len(server.log) == n  # nothing new was sent
    key = ["user_id", "item_id"]
    pd.testing.assert_frame_equal(rows1.sort_values(key).reset_index(drop=True),
                                  rows2.sort_values(key).reset_index(drop=True))
    assert sum(x["usage"]["requests"] for x in res2) == 0
    # The key never enters the cache.
    blob = (tmp_path / "c.sqlite").read_bytes()
    assert SECRET.encode() not in blob
    con = sqlite3.connect(tmp_path / "c.sqlite")
    assert all(SECRET not in v for (v,) in con.execute("SELECT value FROM responses"))


def test_cache_key_depends_on_what_identifies_the_answer():
    m = [{"role": "user", "content": "x"}]
    k = request_key("openai", "m", "http://a", {"t": 0}, m)
    assert k == request_key("openai", "m", "http://a", {"t": 0}, m)
    assert k != request_key("openai", "m2", "http://a", {"t": 0}, m)
    assert k != request_key("openai", "m", "http://b", {"t": 0}, m)
    assert k != request_key("openai", "m", "http://a", {"t": 1}, m)


# ---------------------------------------------------------------- budget, dry run, limiter

def test_budget_is_a_hard_cap(server):
    cfg = cfg_for(max_concurrency=1, prices={"fake-model": {"prompt": 1000.0, "completion": 1000.0}})
    units = make_units(4, 10, 5)
    est = dry_run(units, BackendSpec("openai", "fake-model"), cfg)
    budget = est["cost_usd"] * 0.5
    eng = engine_for(server, cfg, budget=budget)
    rows, res = run_units(eng, units, concurrency=1)
    spent = sum(x["usage"]["cost_usd"] for x in res)
    assert 0 < spent <= budget
    failed = rows[rows["status"] == "failed"]
    assert len(failed) > 0 and (failed["reason"] == "budget").all()
    assert len(server.log) < len(units)
    assert_correct(rows)


def test_dry_run_estimates_without_calls(server):
    units = make_units(3, 10, 10)
    est = dry_run(units, BackendSpec("openai", "fake-model", server.base_url), cfg_for())
    assert est["requests"] == len(units) and est["pairs"] == 30 and est["cost_usd"] > 0
    assert est["prompt_tokens_per_rating"] <= 120
    assert len(server.log) == 0


def test_token_bucket_spaces_requests():
    t = [0.0]
    lim = RateLimiter(rpm=120, tpm=1e9, burst_s=1.0, clock=lambda: t[0])  # burst of 2
    waits = [lim.reserve(10) for _ in range(6)]
    # 2 per second, burst of 2: the 3rd waits 0.5 s, then 1.0, 1.5, ...
    assert waits[:2] == [0.0, 0.0]
    assert waits[2:] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    t[0] = 10.0
    assert lim.reserve(10) == 0.0
    lim.reserve(10)
    lim.pause(3.0)
    assert lim.reserve(10) == pytest.approx(3.0)


def test_token_bucket_limits_tokens_per_minute():
    t = [0.0]
    lim = RateLimiter(rpm=1e6, tpm=600, burst_s=1.0, clock=lambda: t[0])  # 10 tokens/s
    assert lim.reserve(10) == 0.0
    assert lim.reserve(10) == pytest.approx(1.0)


def test_limiter_holds_real_rate(server):
    server.set_faults(rpm_limit=1200, burst=5)  # 20 per second; a little slack for event-loop stalls
    cfg = cfg_for(rpm=1200, max_concurrency=16)
    units = make_units(10, 6, 1)  # 60 requests
    import time

    t0 = time.monotonic()
    rows, _ = run_units(engine_for(server, cfg), units, concurrency=16)
    dt = time.monotonic() - t0
    assert (rows["status"] == "ok").all()
    assert server.count(429) == 0
    assert dt >= 59 / 20 * 0.95  # evenly paced at 20/s
    assert 60 / dt >= 0.8 * 20


# ---------------------------------------------------------------- jobs: shards, manifest, resume

def test_resume_after_partial_run_without_duplicates(server, tmp_path, monkeypatch):
    from rlsim.personas import pool

    units = make_units(5, 6, 3)
    cfg = cfg_for(cache=False, shard_users=1, max_concurrency=1)  # in order: 2 units per shard
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    real_add = pool.ShardWriter.add
    calls = {"n": 0}

    def crashing_add(self, unit, res):
        real_add(self, unit, res)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the job dies part-way
    monkeypatch.setattr(pool.ShardWriter, "add", crashing_add)
    with pytest.raises(KeyboardInterrupt):
        run_rating_job(units, tmp_path / "job", spec, cfg, None, use_ray=False, progress=False)
    monkeypatch.setattr(pool.ShardWriter, "add", real_add)
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    done = set(manifest["shards"])
    assert 0 < len(done) < 5
    before = len(server.log)
    summary = run_rating_job(units, tmp_path / "job", spec, cfg, None, use_ray=False, progress=False)
    assert summary["resumed"] == 1 and summary["duplicates"] == 0
    assert summary["pairs"] == 30 and summary["rated"] == 30
    # Only units of unfinished shards were sent again.
    resent_users = {r.user_id for r in server.log[before:]}
    finished_users = {int(s.split("-")[1]) + 1 for s in done}
    assert not (resent_users & finished_users)
    df = pd.read_parquet(tmp_path / "job" / "ratings.parquet")
    assert not df.duplicated(["user_id", "item_id"]).any() and len(df) == 30
    assert_correct(df)
    assert SECRET not in (tmp_path / "job" / "manifest.json").read_text()


def test_resume_refuses_a_different_job(server, tmp_path):
    from rlsim.errors import ConfigError

    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    run_rating_job(make_units(2, 3, 3), tmp_path / "job", spec, cfg_for(), None, use_ray=False, progress=False)
    with pytest.raises(ConfigError):
        run_rating_job(make_units(3, 3, 3), tmp_path / "job", spec, cfg_for(), None, use_ray=False, progress=False)


# ---------------------------------------------------------------- calibration

def test_quantile_mapping_matches_user_distribution():
    raw = np.array([3, 3, 3, 4, 4, 4, 4, 5, 2, 3], float)
    target = np.array([1, 1, 2, 3, 5, 5, 5, 5, 4, 4], float)
    out = quantile_map(raw, target, SCALE)
    # Order is kept and the spread of the user's own ratings comes back.
    assert (np.diff(out[np.argsort(raw, kind="stable")]) >= 0).all()
    assert out.min() <= 2 and out.max() == 5
    assert set(out) <= set(SCALE.values)
