"""Persona engine against the fake OpenAI server: validation, retries, failures, cache, budget, resume."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import threading
import time

import numpy as np
import pandas as pd
import pytest

from rlsim.data.schema import RatingScale
from rlsim.personas.backends import BackendSpec
from rlsim.personas.cache import ResponseCache, request_key
from rlsim.personas.calibrate import quantile_map
from rlsim.personas.config import PersonaConfig
from rlsim.personas.cost import cost_usd
from rlsim.personas.grounding import WorkUnit
from rlsim.personas.limiter import BUSY, REFUSED, LocalLimiter, RateLimiter
from rlsim.personas.engine import RatingEngine, rate_units_local
from rlsim.personas.job import dry_run, run_rating_job
from rlsim.personas.validate import parse_ratings
from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating
from tests.ray_local import private_ray

SCALE = RatingScale(1.0, 5.0, 1.0)
SECRET = "sk-test-do-not-leak-123"


@pytest.fixture
def server():
    srv = FakeOpenAI(FaultConfig()).start()
    yield srv
    srv.stop()


def make_units(n_users=4, n_items=12, batch=5, first_user=1, profile_words=0) -> list[WorkUnit]:
    units = []
    for u in range(first_user, first_user + n_users):
        ids = [100 + 3 * j + u for j in range(n_items)]
        for s in range(0, n_items, batch):
            b = ids[s:s + batch]
            items = [{"item_id": i, "title": f"Film {i}", "year": 1990, "genres": "Drama"} for i in b]
            ground = {i: [(f"Old film {i - 1} (1980)", 4.0)] for i in b}
            text = f"A viewer number {u}." + " Likes long quiet films." * profile_words
            units.append(WorkUnit(u, b, text, items, ground, (1.0, 5.0, 1.0)))
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

def budget_for(units, share: float, prices: dict, **kw) -> float:
    """A cap that lets about ``share`` of the units through: room for one request's worst case (what the
    gate reserves) plus that share of their expected cost."""
    est = dry_run(units, BackendSpec("openai", "fake-model"), cfg_for(prices=prices, **kw))
    return est["request_worst_case_usd"] + share * est["cost_usd"]


def test_budget_is_a_hard_cap(server):
    cfg = cfg_for(max_concurrency=1, prices={"fake-model": {"prompt": 1000.0, "completion": 1000.0}})
    units = make_units(4, 10, 5)
    budget = budget_for(units, 0.5, cfg.prices)
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

def run_until_killed(monkeypatch, after: int, units, job_dir, spec, cfg) -> None:
    """Runs the job in this process until its ``after``-th result is recorded, then kills it there
    (a KeyboardInterrupt out of ShardWriter.add: the journal has that result, the rest is lost)."""
    from rlsim.personas import shards

    real_add = shards.ShardWriter.add
    calls = {"n": 0}

    def crashing_add(self, unit, res):
        real_add(self, unit, res)
        calls["n"] += 1
        if calls["n"] == after:
            raise KeyboardInterrupt
    monkeypatch.setattr(shards.ShardWriter, "add", crashing_add)
    with pytest.raises(KeyboardInterrupt):
        run_rating_job(units, job_dir, spec, cfg, None, use_ray=False, progress=False)
    monkeypatch.setattr(shards.ShardWriter, "add", real_add)


def test_resume_after_partial_run_without_duplicates(server, tmp_path, monkeypatch):
    units = make_units(5, 6, 3)
    cfg = cfg_for(cache=False, shard_users=1, max_concurrency=1)  # in order: 2 units per shard
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    run_until_killed(monkeypatch, 5, units, tmp_path / "job", spec, cfg)
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


# ---------------------------------------------------------------- limits that hold (tokens, cluster, restarts)

@pytest.fixture(scope="module")
def ray_local():
    """A private Ray for this module (joined when one is already running in this process)."""
    with private_ray("rlp") as ray:
        yield ray


def test_tokens_per_minute_are_enforced_without_a_burst():
    # The measured bug: with the default burst_s=0 these went out 0.1 s apart.
    t = [0.0]
    lim = RateLimiter(rpm=6000, tpm=600, clock=lambda: t[0])
    waits = [lim.reserve(500) for _ in range(5)]
    assert waits == pytest.approx([0.0, 50.0, 100.0, 150.0, 200.0])


def test_reported_usage_corrects_the_token_bucket():
    t = [0.0]
    lim = RateLimiter(rpm=1e6, tpm=600, clock=lambda: t[0])  # 10 tokens/s
    assert lim.reserve(100) == 0.0
    lim.settle(0.0, 0.0, 100, 300)  # the server counted 300 tokens: 200 more debt
    assert lim.reserve(100) == pytest.approx(30.0)
    lim2 = RateLimiter(rpm=1e6, tpm=600, clock=lambda: t[0])
    lim2.reserve(100)
    lim2.settle(0.0, 0.0, 100, 20)  # only 20 were used: 80 come back
    assert lim2.reserve(100) == pytest.approx(2.0)


def test_tokens_per_minute_hold_against_the_servers_usage(server):
    # ~290-token requests (server-reported prompt + completion) at 30k tokens/min: ~1.7 per second.
    units = make_units(12, 1, 1, profile_words=40)
    tpm = 30000
    cfg = cfg_for(rpm=1e6, tpm=tpm, max_concurrency=16)
    rows, _ = run_units(engine_for(server, cfg), units, concurrency=16)
    assert (rows["status"] == "ok").all()
    log = sorted(server.log, key=lambda r: r.t)
    tokens = [r.prompt_tokens + r.completion_tokens for r in log]
    assert min(tokens) > 250
    rate = sum(tokens[:-1]) / (log[-1].t - log[0].t) * 60
    # Unpaced (the old bucket) all 12 go out at once; the bounds leave room for a stalled event loop.
    assert rate <= 1.3 * tpm, rate
    assert rate >= 0.5 * tpm, rate  # paced, not throttled far below the limit


def test_strictest_limits_win_and_jobs_are_told():
    t = [0.0]
    lim = RateLimiter(clock=lambda: t[0], lease_s=60)
    a = lim.register("a", rpm=600, tpm=1e6)
    assert a["rpm"] == 600 and not a["stricter_elsewhere"] and a["other_jobs"] == 0
    b = lim.register("b", rpm=60, tpm=1e6)
    assert b["rpm"] == 60 and not b["stricter_elsewhere"] and b["other_jobs"] == 1
    c = lim.register("c", rpm=1200, tpm=1e6)
    assert c["rpm"] == 60 and c["stricter_elsewhere"]
    # Everyone is paced at the strictest limit: one request per second, whoever asks.
    assert [lim.reserve(1, job=j) for j in ("a", "c", "a")] == pytest.approx([0.0, 1.0, 2.0])
    assert lim.job_stats("a")["min_rpm"] == 60
    lim.unregister("b")
    assert lim.limits["rpm"] == 600
    # A job that stops calling (its driver died) stops counting once its lease runs out.
    lim.register("d", rpm=30, tpm=1e6)
    assert lim.limits["rpm"] == 30
    t[0] += 61
    lim.reserve(1, job="a")
    assert lim.limits["rpm"] == 600


def test_limiter_state_is_restored_from_its_store():
    class Store:
        data = None

        def load(self):
            return json.loads(self.data) if self.data else None

        def save(self, state):
            self.data = json.dumps(state)

    t = [0.0]
    store = Store()
    lim = RateLimiter(clock=lambda: t[0], store=store)
    lim.register("j", rpm=60, tpm=1e6, budget_usd=1.0)
    assert lim.reserve(1, 0.4, job="j") == 0.0
    lim.settle(0.4, 0.3, job="j")
    assert lim.reserve(1, 0.4, job="j") == pytest.approx(1.0)  # still in flight when the actor dies
    lim.pause(5.0)
    again = RateLimiter(clock=lambda: t[0], store=store)  # what a restarted actor does
    st = again.job_stats("j")
    assert st["restored"] and st["spent_usd"] == pytest.approx(0.3) and st["reserved_usd"] == pytest.approx(0.4)
    assert again.reserve(1, 0.4, job="j") == BUSY  # 0.3 spent + 0.4 in flight + 0.4 > 1.0: wait for it
    assert again.reserve(1, 0.8, job="j") == REFUSED  # 0.3 spent + 0.8 > 1.0 whatever settles
    assert again.reserve(1, 0.2, job="j") == pytest.approx(5.0)  # the pause and the bucket came back too
    # A job that rejoins (resumes) after dying counts its in-flight reservations as spent.
    assert again.register("j", rpm=60, tpm=1e6, budget_usd=1.0)["spent_usd"] == pytest.approx(0.9)


@pytest.mark.parametrize("field,value", [
    ("rpm", 0), ("tpm", -5.0), ("rpm", float("nan")), ("batch_size", 0), ("n_workers", 0), ("max_concurrency", 0),
    ("timeout_s", 0), ("max_retries", -1), ("shard_users", 0), ("budget_usd", -1.0), ("backend", "gpt"),
    ("max_output_tokens", 0), ("prices", {"m": {"prompt": 1}}),
])
def test_persona_config_is_validated(field, value):
    from rlsim.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        PersonaConfig(**{field: value}).validate()
    assert "\n" not in str(e.value)


def test_a_budget_needs_a_price():
    from rlsim.errors import ConfigError

    PersonaConfig(backend="openai", model="gpt-4o-mini-2024-07-18", budget_usd=1.0).validate()
    with pytest.raises(ConfigError, match="no price"):
        PersonaConfig(backend="openai", model="my-local-llama", budget_usd=1.0).validate()
    PersonaConfig(backend="openai", model="my-local-llama").validate()  # no budget: no price needed


def test_library_needs_a_running_ray_for_use_ray(data_root, cache_root, tmp_path, monkeypatch):
    import ray

    from rlsim.config import DataConfig
    from rlsim.errors import ConfigError
    from rlsim.personas.config import PersonaConfig
    from rlsim.personas.run import evaluate_stage

    if ray.is_initialized():
        pytest.skip("a Ray is running in this process")
    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=str(data_root), cache_dir=str(cache_root),
                      download=False)
    with pytest.raises(ConfigError, match="running Ray"):
        evaluate_stage(dcfg, PersonaConfig(), tmp_path / "x", users=2, use_ray=True, progress=False)
    assert not ray.is_initialized()  # the library never starts Ray itself


def test_one_limiter_per_cluster_and_endpoint(ray_local):
    from rlsim.personas.limiter import LIMITER_NAMESPACE, limiter_name
    from rlsim.personas.limiter_actor import cluster_limiter, get_limiter

    n = limiter_name("http://host:1/v1", "m")
    assert n == limiter_name("http://host:1/v1/", "m")
    assert len({n, limiter_name("http://host:1/v1", "m2"), limiter_name("http://other:1/v1", "m")}) == 3
    h1, h2 = cluster_limiter(n), cluster_limiter(n)
    assert h1._actor_id == h2._actor_id == get_limiter(n)._actor_id
    ray = ray_local
    names = {(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)}
    assert (n, LIMITER_NAMESPACE) in names


def _run_in_thread(fn, *args, **kw):
    box = {}

    def target():
        try:
            box["result"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            box["error"] = exc
    th = threading.Thread(target=target)
    th.start()
    return th, box


def test_two_jobs_on_one_cluster_share_one_limit(server, tmp_path, ray_local):
    rpm = 1200  # 20 requests per second for both jobs together
    cfg = cfg_for(rpm=rpm, max_concurrency=8, n_workers=1, cache=False)
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    # 120 requests per job: 6 s alone at the whole limit, so a job that starts seconds late (a loaded
    # machine starts its Ray worker late) still overlaps the other for most of its run.
    jobs = [_run_in_thread(run_rating_job, make_units(12, 10, 1, first_user=f), tmp_path / f"job{f}", spec, cfg, None,
                           use_ray=True, progress=False) for f in (1, 21)]
    for th, _ in jobs:
        th.join(240)
    for _, box in jobs:
        assert "error" not in box, box.get("error")
        assert box["result"]["rated"] == 120
    log = sorted(server.log, key=lambda r: r.t)
    assert len(log) == 240 and server.count(429) == 0
    both = [r.t for r in log]
    lo, hi = len(both) // 10, len(both) - len(both) // 10 - 1  # the steady middle
    first_b = min(r.t for r in log if r.user_id > 20)
    first_a = min(r.t for r in log if r.user_id <= 20)
    assert max(first_a, first_b) < min(max(r.t for r in log if r.user_id <= 20),
                                       max(r.t for r in log if r.user_id > 20))  # they did overlap
    combined = (hi - lo) / (both[hi] - both[lo]) * 60
    # With a limiter per job the two together ran at twice the limit; the bound leaves room for stalls.
    assert combined <= 1.4 * rpm, combined
    assert jobs[0][1]["result"]["limits"]["limiter"] == jobs[1][1]["result"]["limits"]["limiter"]


def test_limiter_state_and_budget_survive_a_restart(server, tmp_path, ray_local):
    from rlsim.personas.limiter import limiter_name
    from rlsim.personas.limiter_actor import get_limiter

    ray = ray_local
    prices = {"fake-model": {"prompt": 1000.0, "completion": 1000.0}}
    units = make_units(6, 4, 1)  # 24 requests at 10 per second
    budget = budget_for(units, 0.5, prices)
    cfg = cfg_for(rpm=600, max_concurrency=2, n_workers=1, cache=False, prices=prices, budget_usd=budget)
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    th, box = _run_in_thread(run_rating_job, units, tmp_path / "job", spec, cfg, None, use_ray=True, progress=False)
    t0 = time.monotonic()
    while len(server.log) < 5 and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    handle = get_limiter(limiter_name(server.base_url, "fake-model"))
    ray.kill(handle, no_restart=False)  # the actor restarts from the state it saved
    th.join(120)
    assert "error" not in box, box.get("error")
    s = box["result"]
    spent_at_server = sum(cost_usd(prices, "fake-model", r.prompt_tokens, r.completion_tokens)
                          for r in server.log if r.status == 200)
    assert spent_at_server <= budget + 1e-9  # the restarted limiter did not forget the spend
    assert s["failure_reasons"].get("budget", 0) > 0 and s["rated"] > 0
    st = ray.get(get_limiter(limiter_name(server.base_url, "fake-model")).job_stats.remote(s["limits"]["job"]))
    assert st["restored"] and st["spent_usd"] >= spent_at_server - 1e-9


# ---------------------------------------------------------------- hard budget across kills, resume that retries

PRICEY = {"fake-model": {"prompt": 1000.0, "completion": 1000.0}}


def _spent_at(server) -> float:
    return sum(cost_usd(PRICEY, "fake-model", r.prompt_tokens, r.completion_tokens)
               for r in server.log if r.status == 200)


def test_spend_of_a_killed_run_counts_on_resume(server, tmp_path, monkeypatch):
    units = make_units(2, 10, 1)  # 20 one-movie units in ONE shard: no shard finishes before the kill
    budget = budget_for(units, 0.6, PRICEY)
    cfg = cfg_for(cache=False, shard_users=100, max_concurrency=1, prices=PRICEY, budget_usd=budget)
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    run_until_killed(monkeypatch, 8, units, tmp_path / "job", spec, cfg)
    assert json.loads((tmp_path / "job" / "manifest.json").read_text())["shards"] == {}
    first = _spent_at(server)
    s = run_rating_job(units, tmp_path / "job", spec, cfg, None, use_ray=False, progress=False)
    assert _spent_at(server) <= budget + 1e-9  # both runs together stay under the cap
    assert s["spent_usd"] >= first and s["failure_reasons"].get("budget", 0) > 0
    assert s["pairs"] == 20 and s["missing_pairs"] == 0


def test_a_budget_stop_is_retried_on_resume(server, tmp_path):
    units = make_units(3, 6, 3)
    cfg = cfg_for(max_concurrency=1, prices=PRICEY, budget_usd=budget_for(units, 0.4, PRICEY))
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    s1 = run_rating_job(units, tmp_path / "job", spec, cfg, None, use_ray=False, progress=False)
    stopped = s1["failure_reasons"]["budget"]
    assert stopped > 0 and s1["retryable_failed"] == stopped
    n = len(server.log)
    s2 = run_rating_job(units, tmp_path / "job", spec, dataclasses.replace(cfg, budget_usd=1e6), None,
                        use_ray=False, progress=False)
    assert s2["resumed"] == 1 and s2["retried"] == stopped
    assert s2["rated"] == 18 and s2["failed"] == 0 and len(server.log) > n
    df = pd.read_parquet(tmp_path / "job" / "ratings.parquet")
    assert len(df) == 18 and not df.duplicated(["user_id", "item_id"]).any()
    assert_correct(df)


def test_resume_retries_transient_failures_and_keeps_permanent_ones(server, tmp_path):
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    cfg = cfg_for(max_retries=0)
    units = make_units(2, 4, 2)
    server.set_faults(p_500=1.0)
    s1 = run_rating_job(units, tmp_path / "t", spec, cfg, None, use_ray=False, progress=False)
    assert s1["failure_reasons"] == {"http_500": 8}
    server.set_faults(p_500=0.0)
    s2 = run_rating_job(units, tmp_path / "t", spec, cfg, None, use_ray=False, progress=False)
    assert s2["retried"] == 8 and s2["rated"] == 8
    # A permanent failure (the endpoint refuses the request) is final: not asked again.
    bad = BackendSpec("openai", "fake-model", server.url + "/nope/v1", api_key=SECRET)
    p1 = run_rating_job(units, tmp_path / "p", bad, cfg, None, use_ray=False, progress=False)
    assert p1["failure_reasons"] == {"http_404": 8} and p1["retryable_failed"] == 0
    n = len(server.log)
    p2 = run_rating_job(units, tmp_path / "p", bad, cfg, None, use_ray=False, progress=False)
    assert p2["retried"] == 0 and len(server.log) == n and p2["failed"] == 8


def test_unusable_answers_are_asked_again_on_resume_not_replayed(server, tmp_path):
    cache = str(tmp_path / "c.sqlite")
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    cfg = cfg_for(max_retries=1)
    units = make_units(2, 3, 3)
    server.set_faults(p_malformed=1.0, answer_text="I would rather not say.")
    s1 = run_rating_job(units, tmp_path / "job", spec, cfg, cache, use_ray=False, progress=False)
    assert s1["failure_reasons"] == {"malformed_json": 6}
    n = len(server.log)
    server.set_faults(p_malformed=0.0, answer_text=None)
    s2 = run_rating_job(units, tmp_path / "job", spec, cfg, cache, use_ray=False, progress=False)
    assert s2["retried"] == 6 and s2["rated"] == 6
    assert len(server.log) == n + len(units)  # new requests, not the cached nonsense again
    # A fresh folder replays the first run's answers from the cache exactly (no request).
    s3 = run_rating_job(units, tmp_path / "job2", spec, cfg, cache, use_ray=False, progress=False)
    assert s3["failure_reasons"] == {"malformed_json": 6} and len(server.log) == n + len(units)


def test_resume_refuses_other_profiles_dataset_or_split(server, tmp_path):
    from rlsim.errors import ConfigError

    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    ctx = {"dataset": "ml-100k", "split": "u1", "profiles_sha256": "aaa"}
    run_rating_job(make_units(2, 3, 3), tmp_path / "job", spec, cfg_for(), None, use_ray=False, progress=False,
                   context=ctx)
    for change in ({"profiles_sha256": "bbb"}, {"split": "u2"}, {"dataset": "ml-1m"}):
        with pytest.raises(ConfigError, match=next(iter(change))):
            run_rating_job(make_units(2, 3, 3), tmp_path / "job", spec, cfg_for(), None, use_ray=False,
                           progress=False, context={**ctx, **change})


def test_a_torn_journal_line_is_ignored(server, tmp_path):
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    units = make_units(2, 3, 3)
    run_rating_job(units, tmp_path / "job", spec, cfg_for(cache=False), None, use_ray=False, progress=False)
    j = tmp_path / "job" / "journal.jsonl"
    lines = j.read_text().splitlines(keepends=True)
    j.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    n = len(server.log)
    s = run_rating_job(units, tmp_path / "job", spec, cfg_for(cache=False), None, use_ray=False, progress=False)
    assert s["rated"] == 6 and len(server.log) == n + 1  # only the torn unit is asked again
    s = run_rating_job(units, tmp_path / "job", spec, cfg_for(cache=False), None, use_ray=False, progress=False)
    assert s["rated"] == 6 and len(server.log) == n + 1


# ---------------------------------------------------------------- one gate for every request (plain and gated backends)

def test_the_gate_settles_with_reported_usage_and_charges_failures_like_the_engine():
    from rlsim.personas.backends import BudgetExceeded, TransientError
    from rlsim.personas.gate import LimiterGate
    from rlsim.personas.usage import empty_usage

    t = [0.0]
    prices = {"m": {"prompt": 1e6, "completion": 1e6}}  # $1 per token
    lim = RateLimiter(rpm=1e6, tpm=600, budget_usd=1000.0, clock=lambda: t[0])  # 10 tokens/s
    usage = empty_usage()
    gate = LimiterGate(LocalLimiter(lim), prices, "m", usage)

    async def go():
        r = await gate.acquire(80, 20)
        assert (r.usd, r.tokens) == (100.0, 100)
        assert lim.budget.reserved_usd == 100.0
        level = lim.tok.level
        await gate.release(r, 250, 50)  # the server counted 300 tokens: 200 more debt, $300 spent
        assert lim.tok.level == pytest.approx(level - 200)
        t[0] += 100.0  # the bucket refills
        r = await gate.acquire(80, 20)
        level = lim.tok.level
        await gate.release(r, error=TransientError("timeout"))  # may have been billed: its estimate
        assert lim.tok.level == pytest.approx(level)  # no usage reported: the estimate stays taken
        t[0] += 100.0
        r = await gate.acquire(80, 20)
        await gate.release(r, error=TransientError("http_429", 1.0, 429))  # refused: nothing
        with pytest.raises(BudgetExceeded):  # 400 spent + 700 > 1000: nothing may be sent
            await gate.acquire(500, 200)

    asyncio.run(go())
    assert lim.budget.spent_usd == pytest.approx(400.0) and lim.budget.reserved_usd == 0.0
    assert lim.granted == 3
    assert {k: usage[k] for k in ("requests", "prompt_tokens", "completion_tokens")} == \
        {"requests": 3, "prompt_tokens": 250, "completion_tokens": 50}
    assert usage["cost_usd"] == pytest.approx(400.0)


class TwiceBackend:
    """A gated backend sending two HTTP requests per answer (as TinyTroupe 0.5 does: TALK, then DONE)."""

    gated = True

    def __init__(self, spec):
        from rlsim.personas.backends.openai_backend import OpenAIBackend

        self.inner = OpenAIBackend(spec)

    async def chat(self, messages, response_format, params, gate=None):
        from rlsim.personas.backends import ChatResult
        from rlsim.personas.prompts import messages_tokens

        p = c = 0
        for _ in range(2):
            r = await gate.acquire(messages_tokens(messages), 40)
            try:
                res = await self.inner.chat(messages, response_format, params)
            except Exception as exc:
                await gate.release(r, error=exc)
                raise
            await gate.release(r, res.prompt_tokens, res.completion_tokens)
            p, c = p + res.prompt_tokens, c + res.completion_tokens
        return ChatResult(res.text, p, c, 2)

    async def close(self):
        await self.inner.close()


def test_a_gated_backend_spends_through_the_jobs_budget_ledger_and_journal(server, tmp_path, monkeypatch):
    from rlsim.personas import engine

    monkeypatch.setattr(engine, "build_backend", TwiceBackend)
    units = make_units(2, 10, 1)
    budget = budget_for(units, 0.5, PRICEY)  # about a quarter of the units: each answer costs two requests
    cfg = cfg_for(cache=False, max_concurrency=1, prices=PRICEY, budget_usd=budget)
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    s = run_rating_job(units, tmp_path / "job", spec, cfg, None, use_ray=False, progress=False)
    log = [r for r in server.log if r.status == 200]
    assert len(log) == len(server.log) and s["usage"]["requests"] == len(log)  # every request is counted
    assert s["usage"]["prompt_tokens"] == sum(r.prompt_tokens for r in log)
    assert s["usage"]["completion_tokens"] == sum(r.completion_tokens for r in log)
    assert _spent_at(server) <= budget + 1e-9 and s["failure_reasons"].get("budget", 0) > 0
    assert s["usage"]["cost_usd"] == pytest.approx(_spent_at(server))
    ledger = json.loads((tmp_path / "job" / "spend.json").read_text())  # what a resume starts from
    assert ledger["spent_usd"] == pytest.approx(_spent_at(server)) and ledger["reserved_usd"] == 0.0
    assert 0 < s["rated"] < 20 and s["rated"] * 2 <= len(log)


def test_resume_identity_holds_the_prompt_templates(server, tmp_path, monkeypatch):
    """A rerun with changed rating templates is another job: its answers would not match the folder's."""
    from rlsim.errors import ConfigError
    from rlsim.personas import prompts

    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    units = make_units(2, 3, 3)
    run_rating_job(units, tmp_path / "job", spec, cfg_for(), None, use_ray=False, progress=False)
    same = run_rating_job(units, tmp_path / "job", spec, cfg_for(), None, use_ray=False, progress=False)
    assert same["resumed"] == 1
    monkeypatch.setattr(prompts, "SYSTEM", prompts.SYSTEM + " Be brief.")
    with pytest.raises(ConfigError, match="prompts_sha256 differ"):
        run_rating_job(units, tmp_path / "job", spec, cfg_for(), None, use_ray=False, progress=False)


def test_resume_identity_holds_the_text_model(server, tmp_path):
    from rlsim.config import DataConfig
    from rlsim.errors import ConfigError
    from rlsim.personas.stages_common import job_context

    split = type("S", (), {"name": "u1", "test": pd.DataFrame({"user_id": [1], "item_id": [2]})})()
    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    units = make_units(2, 3, 3)
    ctx = job_context(DataConfig(text_model="model-a"), split, cfg_for())
    assert ctx["text_model"] == "model-a"
    assert "text_model" not in job_context(DataConfig(text_model="model-a"), split, cfg_for(k_similar=0))
    run_rating_job(units, tmp_path / "job", spec, cfg_for(), None, use_ray=False, progress=False, context=ctx)
    other = job_context(DataConfig(text_model="model-b"), split, cfg_for())
    with pytest.raises(ConfigError, match="text_model differ"):
        run_rating_job(units, tmp_path / "job", spec, cfg_for(), None, use_ray=False, progress=False, context=other)


def test_an_older_manifest_without_the_new_identity_keys_is_refused_as_older(server, tmp_path):
    from rlsim.errors import ConfigError

    spec = BackendSpec("openai", "fake-model", server.base_url, api_key=SECRET)
    units = make_units(2, 3, 3)
    run_rating_job(units, tmp_path / "job", spec, cfg_for(), None, use_ray=False, progress=False)
    p = tmp_path / "job" / "manifest.json"
    m = json.loads(p.read_text())
    del m["identity"]["prompts_sha256"]  # as written before the templates were part of the identity
    p.write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="older rlsim"):
        run_rating_job(units, tmp_path / "job", spec, cfg_for(), None, use_ray=False, progress=False)
