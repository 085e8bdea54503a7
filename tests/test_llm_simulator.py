"""LLM personas as simulators (rlsim.simulators.llm) against the fake OpenAI server: the session in
the prompt, distributions from logprobs / samples / calibrated noise, failures, summaries, the
simulator actor under the cluster limiter and budget, and PPO end to end."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time

import numpy as np
import pandas as pd
import pytest

from rlsim.data.schema import RatingScale
from rlsim.personas.backends import BackendSpec
from rlsim.personas.cache import ResponseCache, request_key
from rlsim.personas.config import PersonaConfig
from rlsim.personas.grounding import PromptBuilder, WorkUnit
from rlsim.personas.limiter import LocalLimiter, RateLimiter
from rlsim.personas.engine import RatingEngine
from rlsim.personas.prompts import rating_messages
from rlsim.simulators.base import Session
from rlsim.simulators.llm import LLMPersonaSimulator
from rlsim.simulators.llm_config import LLMSimConfig
from rlsim.simulators.llm_logprobs import logprob_distributions
from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating, rating_distribution
from tests.ray_local import barrier, private_ray

SCALE = RatingScale(1.0, 5.0, 1.0)
SECRET = "sk-llmsim-do-not-leak-42"
N_USERS, N_ITEMS = 20, 60


def frames(noisy: bool = False):
    """Training ratings (the server's own answers unless noisy) and items."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(1, N_USERS + 1):
        for i in rng.choice(np.arange(1, N_ITEMS + 1), 30, replace=False):
            r = float(rng.integers(1, 6)) if noisy else float(expected_rating(u, int(i)))
            rows.append((u, int(i), r, int(rng.integers(0, 10**6))))
    train = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame({"item_id": np.arange(1, N_ITEMS + 1), "title": [f"Film {i}" for i in range(1, N_ITEMS + 1)],
                          "year": 1990, "genres": "Drama"})
    return train, items


def pcfg(**kw) -> PersonaConfig:
    base = dict(backend="openai", model="fake-model", rpm=60000, tpm=1e9, backoff_base_s=0.01, backoff_max_s=0.05,
                timeout_s=10.0, max_retries=3, batch_size=10)
    base.update(kw)
    return PersonaConfig(**base)


def make_sim(srv, noisy=False, cache=None, budget=None, persona=None, **kw) -> LLMPersonaSimulator:
    train, items = frames(noisy)
    cfg = persona or pcfg()

    def make_builder(tr):
        return PromptBuilder(tr, items, SCALE, {u: f"Viewer {u}." for u in range(1, N_USERS + 1)}, None, 0,
                             cfg.batch_size)

    spec = BackendSpec("openai", "fake-model", srv.base_url, timeout_s=cfg.timeout_s, api_key=SECRET)
    engine = RatingEngine(spec, cfg, LocalLimiter(RateLimiter(cfg.rpm, cfg.tpm, budget)), cache)
    return LLMPersonaSimulator(make_builder(train), engine, SCALE, LLMSimConfig(**kw), train=train,
                               make_builder=make_builder)


@pytest.fixture
def server():
    srv = FakeOpenAI(FaultConfig()).start()
    yield srv
    srv.stop()


def low(*items) -> Session:
    return Session(tuple(items), tuple(1.0 for _ in items))


def asked_requests(server):
    """The calibration requests: after the two probes, before the last (the rating asked for)."""
    return [r for r in server.log[2:] if r.n_choices == 1 and not r.logprobs][:-1]


def assert_accounted(sim):
    st = sim.stats()
    assert st["requested"] == st["answered"] + st["failed"]
    assert st["failed"] == sum(st["failed_by_reason"].values())


# ---------------------------------------------------------------- the session is in the prompt

def test_prompt_carries_the_session_and_the_cache_key_changes():
    items = [{"item_id": 7, "title": "Film 7", "year": 1990, "genres": "Drama"}]
    plain = WorkUnit(3, [7], "A viewer.", items, {}, (1.0, 5.0, 1.0))
    # Without a session the messages (hence every existing cache key) are exactly as before.
    assert plain.messages() == rating_messages(3, "A viewer.", items, {}, SCALE)
    with_s = WorkUnit(3, [7], "A viewer.", items, {}, (1.0, 5.0, 1.0), session=[("Heat (1995)", 4.0),
                                                                                 ("Big (1988)", 1.0)])
    text = with_s.messages()[-1]["content"]
    assert "In this session you were shown, in order: Heat (1995) — you rated 4; Big (1988) — you rated 1." in text
    assert with_s.subset([7]).messages() == with_s.messages()  # retries keep the session
    other = WorkUnit(3, [7], "A viewer.", items, {}, (1.0, 5.0, 1.0), session=[("Heat (1995)", 5.0)])

    def key(u):
        return request_key("openai", "m", None, {"temperature": 0}, u.messages())

    assert len({key(plain), key(with_s), key(other)}) == 3


def test_the_session_reaches_the_server_and_moves_the_answer(server, tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    sim = make_sim(server, cache=cache, method="logprobs")
    u, i = 2, 4  # expected rating 4: a low session moves it to 3
    assert expected_rating(u, i) == 4
    p = sim.distribution(np.array([u, u]), np.array([i, i]), [Session(), low(3, 5)])
    assert p[0].argmax() == 3 and p[1].argmax() == 2
    line = "In this session you were shown, in order: Film 3 (1990) [Drama] — you rated 1; Film 5 (1990) [Drama] — you rated 1."
    assert sum(line in r.messages_text for r in server.log) == 1
    n = len(server.log)
    again = sim.distribution(np.array([u, u]), np.array([i, i]), [Session(), low(3, 5)])
    assert len(server.log) == n and np.allclose(again, p)  # the same user, movie and session: asked once
    assert sim.stats()["from_memo"] == 2
    fresh = make_sim(server, cache=cache, method="logprobs")  # another simulator, the same response cache
    assert np.allclose(fresh.distribution(np.array([u, u]), np.array([i, i]), [Session(), low(3, 5)]), p)
    assert len(server.log) == n and fresh.stats()["from_cache"] == 2
    sim.distribution(np.array([u]), np.array([i]), [low(3, 5, 8)])
    assert len(server.log) == n + 1  # a new session is a new request
    assert_accounted(sim)
    assert_accounted(fresh)


def test_a_pair_is_asked_once_whatever_prompt_it_came_in(server):
    sim = make_sim(server, method="logprobs", movies_per_prompt=10)
    s = low(3)
    first = sim.distribution(np.array([1, 1]), np.array([5, 6]), [s, s])
    second = sim.distribution(np.array([1, 1]), np.array([5, 7]), [s, s])  # 5 again, beside another movie
    assert [sorted(r.item_ids) for r in server.log] == [[5, 6], [7]]
    assert np.allclose(first[0], second[0]) and sim.stats()["from_memo"] == 1


def test_concurrent_calls_share_a_pair_in_flight(server):
    server.set_faults(latency_s=0.2)
    sim = make_sim(server, method="logprobs")

    async def main():
        try:
            return await asyncio.gather(sim.adistribution(np.array([1]), np.array([5]), [low(3)]),
                                        sim.adistribution(np.array([1, 2]), np.array([5, 5]), [low(3), low(3)]))
        finally:
            await sim.engine.aclose()

    a, b = asyncio.run(main())
    assert np.allclose(a[0], b[0]) and np.isfinite(b).all()
    assert sorted(r.user_id for r in server.log) == [1, 2]  # (1, 5, session) was asked once for both calls
    assert_accounted(sim)


def test_pairs_of_one_user_and_session_share_a_prompt(server):
    sim = make_sim(server, method="logprobs", movies_per_prompt=10)
    s = low(3)
    users = np.array([1, 1, 1, 1, 2])
    items = np.array([5, 6, 5, 7, 5])
    p = sim.distribution(users, items, [s, s, s, Session(), s])
    assert np.isfinite(p).all()
    assert sorted(sorted(r.item_ids) for r in server.log) == [[5], [5, 6], [7]]
    assert np.allclose(p[0], p[2]) and sim.stats()["repeated_in_call"] == 1


def test_one_movie_per_prompt_by_default(server):
    sim = make_sim(server, method="logprobs")
    s = low(3)
    p = sim.distribution(np.array([1, 1, 1, 1, 2]), np.array([5, 6, 5, 7, 5]), [s, s, s, Session(), s])
    assert np.isfinite(p).all() and sorted(r.item_ids for r in server.log) == [[5], [5], [6], [7]]
    assert sim.stats()["prompts"] == 4 and sim.describe()["movies_per_prompt"] == 1


@pytest.mark.parametrize("method", ["logprobs", "samples"])
def test_a_distribution_does_not_depend_on_the_movies_asked_beside_it(server, method):
    """The server anchors each movie's answer on the one written before it (as a model writing JSON
    does): the same (user, session, movie) asked alone, after another movie, or before one, in
    fresh simulators, gets the identical distribution."""
    server.set_faults(anchoring=True)
    s = low(3)
    kw = {"method": method, "samples": 50}
    alone = make_sim(server, **kw).distribution(np.array([1]), np.array([12]), [s])[0]
    after = make_sim(server, **kw).distribution(np.array([1, 1]), np.array([11, 12]), [s, s])[1]
    before = make_sim(server, **kw).distribution(np.array([1, 1]), np.array([12, 13]), [s, s])[0]
    assert np.array_equal(alone, after) and np.array_equal(alone, before)
    assert alone.argmax() == expected_rating(1, 12) - 2  # its own answer: 5, one star down for the session


# ---------------------------------------------------------------- where the distribution comes from

def test_logprobs_distribution_equals_the_server_token_probabilities(server):
    sim = make_sim(server)
    assert sim.method == "auto (not probed yet)"
    users, items = np.array([1, 2, 3, 4]), np.array([10, 11, 12, 13])
    sessions = [Session(), low(5, 6), Session(), low(7)]
    p = sim.distribution(users, items, sessions)
    want = [rating_distribution(u, i, -1 if len(s) else 0) for u, i, s in zip(users, items, sessions)]
    assert np.allclose(p, want, atol=1e-9)  # the junk alternative is dropped, the rest renormalised
    d = sim.describe()
    assert d["method"] == "logprobs" and d["probe"]["chose"] == "logprobs" and d["top_logprobs"] == 10
    assert d["answered_by_method"] == {"logprobs": 4}
    assert all(r.logprobs for r in server.log)
    assert SECRET not in json.dumps(d)


def test_logprob_parser_reads_the_rating_token():
    lp = math.log
    tokens = [['{"', 0.0, []], ["12", 0.0, []], ['":', 0.0, []],
              [" 4", lp(0.6), [[" 4", lp(0.6)], [" 5", lp(0.3)], ['"', lp(0.05)], ["3", lp(0.05)]]],
              [', "', 0.0, []], ["13", 0.0, []], ['":', 0.0, []], ["2", 0.0, []], [', "', 0.0, []],
              ["15", 0.0, []], ['":', 0.0, []], [" 3", lp(0.9), [[" 3", lp(0.9)], ['"', lp(0.1)]]], ["}", 0.0, []]]
    dists, why = logprob_distributions(tokens, [12, 13, 14, 15], SCALE)
    assert np.allclose(dists[12], [0, 0, 0.05 / 0.95, 0.6 / 0.95, 0.3 / 0.95])
    # No alternatives, or one rating value among them: an answer, not a distribution (never one-hot).
    assert set(dists) == {12}
    assert why == {13: "point_mass_logprobs", 14: "no_logprobs", 15: "point_mass_logprobs"}


@pytest.mark.parametrize("alternatives", ["token", "junk"])
def test_logprobs_without_rating_alternatives_fall_back_to_samples(server, alternatives):
    """A server whose rating tokens carry no numeric alternatives: those rows come from n samples,
    and stats say how many rows each method gave."""
    server.set_faults(logprobs_alternatives=alternatives)
    sim = make_sim(server, method="logprobs", samples=200)
    users, items = np.array([1, 2, 3]), np.array([10, 11, 12])
    p = sim.distribution(users, items)
    assert np.isfinite(p).all() and (np.sort(p, 1)[:, -2] > 0).all()  # no row is a point mass
    for row, (u, i) in zip(p, zip(users, items)):
        assert 0.5 * np.abs(row - rating_distribution(u, i)).sum() < 0.15
    st = sim.stats()
    assert st["answered_by_method"] == {"samples": 3} and st["failed"] == 0
    # Per prompt (one per user): the logprobs answer, then one samples request, no retries.
    assert sorted(r.n_choices for r in server.log) == [1, 1, 1, 200, 200, 200]
    assert_accounted(sim)


def test_logprobs_without_alternatives_and_no_samples_fail_with_a_reason(server):
    server.set_faults(logprobs_alternatives="token", n_supported=False)
    sim = make_sim(server, method="logprobs")
    p = sim.distribution(np.array([1, 2]), np.array([10, 11]))
    assert np.isnan(p).all()
    st = sim.stats()
    assert st["failed_by_reason"] == {"point_mass_logprobs": 2} and st["answered_by_method"] == {}
    assert_accounted(sim)


def test_the_probe_does_not_take_point_mass_logprobs(server):
    server.set_faults(logprobs_alternatives="junk")
    sim = make_sim(server, samples=50)
    p = sim.distribution(np.array([1]), np.array([10]))
    assert sim.describe()["method"] == "samples" and np.isfinite(p).all()
    assert sim.stats()["answered_by_method"] == {"samples": 1}


def test_samples_give_a_smoothed_histogram(server):
    server.set_faults(logprobs_supported=False)
    sim = make_sim(server, samples=400, smoothing=0.5)
    p = sim.distribution(np.array([1, 3]), np.array([10, 11]))
    assert sim.describe()["method"] == "samples" and sim.describe()["samples"] == 400
    counts = p * (400 + 0.5) - 0.5 / 5
    assert np.allclose(counts, np.round(counts), atol=1e-6) and np.allclose(counts.sum(1), 400)
    for row, (u, i) in zip(p, [(1, 10), (3, 11)]):  # 400 draws from the server's distribution
        assert 0.5 * np.abs(row - rating_distribution(u, i)).sum() < 0.12
    assert server.log[-1].n_choices == 400


def test_noise_fallback_is_calibrated_on_a_training_holdout(server):
    from rlsim.data.splits import holdout_validation

    server.set_faults(logprobs_supported=False, n_supported=False)
    sim = make_sim(server, calibration_pairs=40)
    u, i = 2, 5
    p = sim.distribution(np.array([u]), np.array([i]))
    d = sim.describe()
    assert d["method"] == "answer + ordinal noise" and d["noise"]["cuts"]
    cal = d["calibration"]
    assert cal["pairs"] == cal["answered"] == 40 and cal["rmse_of_answers"] == 0.0
    # The pairs asked are a seeded hold-out of the training ratings, never other pairs.
    train, _ = frames()
    _, va = holdout_validation(train, 0.1, 0)
    asked = {(r.user_id, i) for r in asked_requests(server) for i in r.item_ids}
    assert len(asked) == 40 and asked <= set(zip(va["user_id"], va["item_id"]))
    # Every request the server answered is counted; on a loaded machine a retried one (a timeout or a
    # dropped connection) is counted as sent and as an error as well.
    pc = d["usage"]["probe_and_calibration"]
    assert 2 + len(asked_requests(server)) <= pc["requests"] <= 2 + len(asked_requests(server)) + sum(pc["errors"].values())
    # A persona that answers its users' training ratings exactly gets a sharp noise model.
    assert p[0].argmax() == expected_rating(u, i) - 1 and p[0].max() > 0.8
    noisy = make_sim(server, noisy=True, calibration_pairs=40)
    q = noisy.distribution(np.array([u]), np.array([i]))
    assert q[0].max() < 0.6  # far from the training ratings: a wide one


def test_a_fixed_method_needs_no_probe(server):
    sim = make_sim(server, method="samples", samples=4)
    assert sim.describe()["method"] == "samples"
    sim.distribution(np.array([1]), np.array([10]))
    assert len(server.log) == 1 and sim.describe()["probe"] == {}


def test_half_stars_refuse_logprobs():
    from rlsim.errors import ConfigError

    half = RatingScale(0.5, 5.0, 0.5)
    train, items = frames()
    spec = BackendSpec("openai", "fake-model", "http://127.0.0.1:1/v1", api_key=SECRET)
    engine = RatingEngine(spec, pcfg(), LocalLimiter(RateLimiter(600, 1e9)))
    builder = PromptBuilder(train, items, half, {}, None, 0, 10)
    with pytest.raises(ConfigError, match="integer rating scale"):
        LLMPersonaSimulator(builder, engine, half, LLMSimConfig(method="logprobs"), train=train)


# ---------------------------------------------------------------- failures are NaN rows with reasons

@pytest.mark.parametrize("faults,reason", [({"p_500": 1.0}, "http_500"), ({"p_wrong_ids": 1.0}, "missing_from_answer"),
                                           ({"p_malformed": 1.0}, "malformed_json")])
def test_failures_are_nan_with_reasons_never_guesses(server, faults, reason):
    server.set_faults(**faults)
    sim = make_sim(server, persona=pcfg(max_retries=1), method="logprobs")
    p = sim.distribution(np.array([1, 2, 2]), np.array([10, 11, 12]), [Session(), low(3), low(3)])
    assert np.isnan(p).all()
    st = sim.stats()
    assert st["failed_by_reason"] == {reason: 3} and st["answered"] == 0
    assert np.isnan(sim.sample(np.array([1]), np.array([10]), rng=np.random.default_rng(0))).all()
    assert_accounted(sim)


def test_permanent_errors_are_not_retried(server):
    sim = make_sim(server, method="logprobs")
    sim.engine.spec = sim.spec = BackendSpec("openai", "fake-model", server.url + "/nope/v1", api_key=SECRET)
    p = sim.distribution(np.array([1, 2]), np.array([10, 11]))
    assert np.isnan(p).all() and sim.stats()["failed_by_reason"] == {"http_404": 2}
    assert sim.stats()["requests_sent"] == 2  # one request per prompt, none retried


def test_partial_answers_are_asked_again_for_the_rest(server):
    server.set_faults(p_missing=1.0)  # every answer drops its first movie
    sim = make_sim(server, persona=pcfg(max_retries=5), method="logprobs", movies_per_prompt=10)
    p = sim.distribution(np.array([1, 1, 1]), np.array([10, 11, 12]))
    assert np.isfinite(p).all() and [len(r.item_ids) for r in server.log] == [3, 1]


# ---------------------------------------------------------------- dynamic users

def test_summaries_update_every_n_ratings_and_reach_later_prompts(server):
    sim = make_sim(server, method="logprobs", summary_every=2)
    s5 = Session((3, 4, 7, 8, 9), (1.0, 2.0, 5.0, 4.0, 3.0))
    sim.distribution(np.array([1]), np.array([10]), [s5])
    summaries = [r for r in server.log if r.schema_name == "summary"]
    assert len(summaries) == 2  # after 2 and after 4 ratings
    first, second = summaries
    assert "Current summary: Viewer 1." in first.messages_text  # the first update starts from the profile
    assert "Film 3 (1990) [Drama]: 1\nFilm 4 (1990) [Drama]: 2" in first.messages_text
    first_summary = f"Summary {hashlib.sha256(first.messages_text.encode()).hexdigest()[:8]}: 2 new ratings, mean 1.5."
    assert f"Current summary: {first_summary}" in second.messages_text  # built on the first
    rating = [r for r in server.log if r.schema_name == "ratings"][-1]
    # The second summary was built on the first; the rating prompt carries the latest.
    got = [line for line in rating.messages_text.splitlines() if line.startswith("Your tastes")]
    assert len(got) == 1 and got[0].split(": ", 1)[1].startswith("Summary ")
    assert got[0].split(": ", 1)[1] not in second.messages_text
    n = len(server.log)
    # Later prompts of the same session reuse the memoised summaries; a session shorter than N has none.
    sim.distribution(np.array([1, 1]), np.array([11, 12]), [Session(s5.items[:4], s5.ratings[:4]), low(3)])
    assert len([r for r in server.log[n:] if r.schema_name == "summary"]) == 0
    assert "Your tastes" not in [r for r in server.log[n:] if 12 in r.item_ids][0].messages_text
    st = sim.stats()
    assert st["summary_updates"] == 2 and st["usage"]["summaries"]["requests"] == 2
    assert st["usage"]["total"]["requests"] == len(server.log) and st["cost_usd"] > 0


def test_a_failed_summary_keeps_the_previous_one_and_is_counted(server):
    sim = make_sim(server, persona=pcfg(max_retries=0), method="logprobs", summary_every=1)
    server.set_faults(answer_text="not json")  # summaries are unusable; ratings then too
    sim.distribution(np.array([1]), np.array([10]), [low(3)])
    st = sim.stats()
    assert st["summary_failed"] == 1 and st["summary_failures"] == {"malformed_json": 1}


# ---------------------------------------------------------------- the simulator actor

def test_batching_answers_requests_that_arrive_while_a_batch_is_answered():
    """The regression behind the LLM loop: a request arriving while an async simulator answers an
    earlier batch used to wait for yet another request (forever, when none came)."""
    from rlsim.simulators.actor import BatchingSimulator
    from rlsim.simulators.base import Simulator

    class Slow(Simulator):
        name, method = "slow", "test"
        scale = SCALE

        def __init__(self):
            self.inflight = self.most = 0

        async def adistribution(self, users, items, sessions=None):
            self.inflight += 1
            self.most = max(self.most, self.inflight)
            await asyncio.sleep(0.3)
            self.inflight -= 1
            return np.full((len(users), 5), 0.2)

    body = BatchingSimulator(Slow(), max_wait_s=0.0)

    async def main():
        first = asyncio.ensure_future(body.distribution(np.array([1]), np.array([1])))
        await asyncio.sleep(0.1)  # the first batch is being answered
        second = body.distribution(np.array([2]), np.array([2]))
        return await asyncio.wait_for(asyncio.gather(first, second), 30)

    a, b = asyncio.run(main())
    assert a.shape == b.shape == (1, 5) and body.sim.most == 2  # answered beside each other


@pytest.fixture(scope="module")
def ray_local():
    with private_ray("rll") as ray:
        yield ray


@pytest.fixture(scope="module")
def split_100k(data_root, cache_root):
    from rlsim.config import DataConfig
    from rlsim.data import load_split

    return load_split(DataConfig(dataset="ml-100k", split="u1", data_dir=str(data_root), cache_dir=str(cache_root),
                                 download=False))




def test_simulator_actor_batches_callers_under_the_cluster_limiter(ray_local, split_100k, cache_root):
    import ray

    from rlsim.personas.limiter import limiter_name
    from rlsim.personas.limiter_actor import get_limiter
    from rlsim.simulators.actor import SimulatorClient, stop_simulator_actor
    from rlsim.simulators.llm_build import start_llm_persona_actor

    ds, split = split_100k
    users = np.sort(split.train["user_id"].unique())[:8]
    with FakeOpenAI(FaultConfig(latency_s=0.05, rpm_limit=1200, burst=3)) as srv:
        cfg = pcfg(rpm=1200, k_similar=0, cache=False, max_retries=6, base_url=srv.base_url)
        handle = start_llm_persona_actor("llm-sim-test", ds, split.train, cfg, SECRET,
                                         {"method": "logprobs", "movies_per_prompt": 10},
                                         cache_dir=str(cache_root), max_wait_s=2.0)
        gate = barrier(ray, 4)

        @ray.remote(num_cpus=0)
        def runner(k, gate):
            ray.get(gate.wait.remote())
            us = np.repeat(users[2 * k:2 * k + 2], 3)
            its = np.arange(1, 7) + 10 * k
            ss = [low(1 + j) if j % 2 else Session() for j in range(6)]  # 5 (user, session) prompts
            return us, its, ss, SimulatorClient("llm-sim-test").distribution(us, its, ss)

        got = ray.get([runner.remote(k, gate) for k in range(4)])
        for us, its, ss, p in got:
            for u, i, s, row in zip(us, its, ss, p):
                assert row.argmax() == max(1, expected_rating(int(u), int(i)) - (1 if len(s) else 0)) - 1
        st = SimulatorClient("llm-sim-test").stats()
        sim = st["simulator"]
        assert st["requests"] == 4 and st["batches"] < 4  # four callers, gathered
        assert sim["requested"] == sim["answered"] == 24 and sim["failed"] == 0  # no 429 passed on
        assert sim["limiter"]["scope"] == "cluster" and sim["method"] == "logprobs"
        job = ray.get(get_limiter(limiter_name(srv.base_url, "fake-model")).job_stats.remote(sim["limiter"]["job"]))
        assert sim["prompts"] == 20  # pairs of one user and session share a prompt
        assert job["granted"] == sim["requests_sent"] == srv.count() >= 20  # every request through the limiter
        final = stop_simulator_actor(handle)
        assert final["simulator"]["answered"] == 24
        # ray.kill is asynchronous: the actor's name is released once it is gone (bounded wait).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ray.get_actor("llm-sim-test")
            except ValueError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the stopped simulator actor is still alive after 60 s")


def test_the_budget_stops_the_simulator_cleanly(ray_local, split_100k, cache_root):
    import ray  # noqa: F401

    from rlsim.simulators.actor import SimulatorClient, stop_simulator_actor
    from rlsim.simulators.llm_build import start_llm_persona_actor

    ds, split = split_100k
    users = np.sort(split.train["user_id"].unique())[:20]
    with FakeOpenAI(FaultConfig()) as srv:
        # Room for a request's worst case (~$0.003: every prompt byte and 300 completion tokens), not for 20.
        cfg = pcfg(k_similar=0, cache=False, budget_usd=0.005, base_url=srv.base_url)
        handle = start_llm_persona_actor("llm-sim-budget", ds, split.train, cfg, SECRET, {"method": "logprobs"},
                                         cache_dir=str(cache_root))
        try:
            client = SimulatorClient("llm-sim-budget")
            p = client.distribution(users, np.full(20, 1), [low(2)] * 20)
            sim = client.stats()["simulator"]
        finally:
            stop_simulator_actor(handle)
    failed = np.isnan(p).all(1)
    assert 0 < sim["answered"] < 20 and sim["failed_by_reason"] == {"budget": int(failed.sum())}
    assert np.isfinite(p[~failed]).all() and sim["answered"] == int((~failed).sum())
    assert srv.count() == sim["requests_sent"] == sim["answered"] and sim["cost_usd"] <= 0.005 + 1e-12


# ---------------------------------------------------------------- PPO end to end and the CLI edge

def train_llm_policy(tmp_path, data_root, cache_root, monkeypatch, srv, policy: dict | None = None,
                     llm_persona: dict | None = None) -> tuple:
    """One PPO iteration (horizon 2) against the LLM persona behind the fake server ``srv``, through the
    CLI, with extra ``policy:`` / ``llm_persona:`` keys: (the data flags, the config file, the run
    folder, its train_metrics.json)."""
    import yaml

    from rlsim.cli import main

    monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    data = ["--dataset", "ml-100k", "--data-dir", str(data_root), "--cache-dir", str(cache_root), "--no-download"]
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({
        "candidates": {"k": 5},
        "policy": {"train_batch_size": 64, "minibatch_size": 32, "num_epochs": 1, "hidden": 8,
                   "num_envs_per_env_runner": 8, **(policy or {})},
        "personas": {"model": "fake-model", "k_similar": 0, "rpm": 60000},
        **({"llm_persona": llm_persona} if llm_persona else {})}))
    run = tmp_path / "run"
    assert main(["policy", "train", *data, "--config", str(cfg), "--reward", "llm_persona", "--horizon", "2",
                 "--iterations", "1", "--num-cpus", "1", "--quiet", "--out", str(run)]) == 0
    return data, cfg, run, json.loads((run / "train_metrics.json").read_text())


def test_policy_train_and_evaluate_with_reward_llm_persona(tmp_path, data_root, cache_root, monkeypatch):
    from rlsim.cli import main

    with FakeOpenAI(FaultConfig()) as srv:
        data, cfg, run, tm = train_llm_policy(tmp_path, data_root, cache_root, monkeypatch, srv,
                                              llm_persona={"summary_every": 1})
        sim = tm["simulator"]["simulator"]
        assert sim["method"] == "logprobs" and sim["name"] == "llm_persona"
        assert sim["requested"] == sim["answered"] >= 64 and sim["failed"] == 0
        acc = tm["reward_accounting"]  # what the env runners' envs asked of the persona, by outcome
        assert acc["source"] == "llm_persona" and acc["failed"] == 0 and acc["failed_by_reason"] == {}
        assert acc["answered"] == acc["asked"] >= 64 and acc["max_failed_share"] == 0.05
        assert sim["summary_updates"] > 0
        assert any("In this session you were shown" in r.messages_text for r in srv.log)
        assert main(["policy", "evaluate", *data, "--config", str(cfg), "--run", str(run), "--out",
                     str(tmp_path / "ev")]) == 0
        m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
        assert m["simulator"]["method"] == "logprobs" and m["reward"]["kind"] == "llm_persona"
    for f in list(run.rglob("*")) + list((tmp_path / "ev").rglob("*")):  # checkpoints and pickles too
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_llm_persona_needs_an_endpoint(tmp_path, data_root, cache_root, monkeypatch):
    from rlsim.cli import main

    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    rc = main(["policy", "train", "--dataset", "ml-100k", "--data-dir", str(data_root), "--cache-dir",
               str(cache_root), "--reward", "llm_persona", "--out", str(tmp_path / "run")])
    assert rc == 2
    rc = main(["policy", "train", "--dataset", "ml-100k", "--data-dir", str(data_root), "--cache-dir",
               str(cache_root), "--reward", "llm_persona", "--llm-method", "guess", "--base-url",
               "http://127.0.0.1:1/v1", "--out", str(tmp_path / "run")])
    assert rc == 2


def test_the_study_starts_an_llm_persona_when_an_endpoint_is_configured(monkeypatch):
    import os

    from rlsim.commands.study import _llm_persona
    from rlsim.run_config import resolve

    def study_run(sections, **flags):  # as `rlsim study` resolves it: YAML, the environment, the flags given
        return resolve(sections, os.environ, flags)

    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    assert _llm_persona(study_run({"personas": {"backend": "openai"}})) is None  # no endpoint
    run = study_run({})
    assert _llm_persona(run) is None and run.study.llm_persona_actor is None  # the offline persona
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    run = study_run({"personas": {"backend": "openai"}, "llm_persona": {"summary_every": 3}})
    got = _llm_persona(run)
    assert got["api_key"] == SECRET and got["options"] == {"summary_every": 3}
    assert run.study.llm_persona_actor.startswith("rlsim-llm-persona-")
    run.study.validate()  # the source joins the study with the actor it will start
    # An endpoint on the command line is enough: no personas: section, nothing in the environment
    # but the key; the flags' method and summaries reach the simulator's options.
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    run = study_run({"personas": {"backend": "offline"}}, base_url="http://127.0.0.1:9/v1", model="my-model",
                    llm_method="samples", summary_every=2)
    got = _llm_persona(run)
    assert got["persona_cfg"].backend == "openai" and got["persona_cfg"].base_url == "http://127.0.0.1:9/v1"
    assert got["persona_cfg"].model == "my-model" and got["options"] == {"method": "samples", "summary_every": 2}
    assert run.study.llm_persona_actor.startswith("rlsim-llm-persona-")
    # An endpoint in the environment alone does not: the YAML's offline persona stays the study's.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert _llm_persona(study_run({})) is None


def test_study_help_lists_the_endpoint_flags():
    from rlsim.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["study"].format_help()
    assert "--base-url" in text and "--model" in text and "--summary-every" in text


def test_fidelity_runs_on_the_llm_persona(server):
    """The fidelity views take any Simulator; through the fake server the numbers are synthetic
    (its ratings are a formula), so only that they run and cover every pair is checked here."""
    from rlsim.simulators.fidelity import macro, micro

    sim = make_sim(server, method="logprobs")
    train, _ = frames(noisy=True)
    test = train.groupby("user_id").head(3)
    mi, ma = micro(sim, test), macro(sim, test)
    assert mi["coverage"] == 1.0 and np.isfinite(mi["nll"]) and 0 <= ma["tv_sampled"] <= 1


def test_failure_reasons_reach_the_caller_and_fidelity_reports_coverage(server):
    """Past its budget the persona's NaN rows carry the reason ("budget") through the batching body
    (what the env counts), and fidelity's NLL comes with the coverage it was computed on."""
    from rlsim.simulators.actor import BatchingSimulator
    from rlsim.simulators.fidelity import micro

    # A request reserves its worst case (every prompt byte, max_tokens): about $0.0003 here, so these
    # caps let a few requests through and refuse the rest.
    sim = make_sim(server, method="logprobs", budget=0.002)
    body = BatchingSimulator(sim, max_wait_s=0.0)

    async def ask():
        try:
            return await body.distribution_with_reasons(np.arange(1, 21), np.full(20, 10), [low(3)] * 20)
        finally:
            await sim.engine.aclose()

    p, why = asyncio.run(ask())
    failed = np.isnan(p).all(1)
    assert 0 < failed.sum() < 20 and why == ["budget" if f else "" for f in failed]
    train, _ = frames()
    test = train.groupby("user_id").head(2)
    mi = micro(make_sim(server, method="logprobs", budget=0.002), test)
    assert mi["asked"] == len(test) and 0 < mi["answered"] < len(test)
    assert mi["coverage"] == pytest.approx(mi["answered"] / mi["asked"]) and np.isfinite(mi["nll"])
    from rlsim.simulators.fidelity import session_gain

    test = train.assign(timestamp=np.arange(len(train))).groupby("user_id").head(4)
    se = session_gain(make_sim(server, method="logprobs", budget=0.012), test)
    assert 0 < se["coverage"] < 1 and np.isfinite(se["session_nll_gain"])  # over the pairs answered both ways


# ---------------------------------------------------------------- throughput in the loop (slow)

@pytest.mark.slow
def test_ppo_keeps_the_rate_limit_busy(tmp_path, data_root, cache_root):
    """PPO against the LLM persona through the test server (200 ms latency, a 600 requests/min
    limit): the limit is kept busy while sampling, and no rating is lost or duplicated."""
    from bench.llm_loop import run_loop

    r = run_loop(data_root, cache_root, tmp_path, rpm=600, latency=0.2, iterations=2, num_envs=32,
                 num_env_runners=0, train_batch_size=192, dataset="ml-100k", split="u1", horizon=5)
    assert r["llm_loop_lost_ratings"] == 0 and r["llm_loop_duplicated_ratings"] == 0
    assert r["failed_ratings"] == 0 and r["server_429"] <= 3
    assert r["llm_loop_rate_limit_utilisation"] >= 0.8, r


@pytest.mark.slow
def test_the_study_starts_and_stops_its_llm_persona(tmp_path, data_root, cache_root, monkeypatch):
    """`rlsim study` with personas.backend openai and an endpoint: one command starts the LLM persona
    simulator actor, trains and judges a policy on it beside the others, and stops it."""
    import yaml

    from rlsim.cli import main

    with FakeOpenAI(FaultConfig()) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        cfg = {"data": {"dataset": "ml-100k", "split": "u1", "data_dir": str(data_root), "cache_dir": str(cache_root),
                        "download": False},
               "candidates": {"k": 5},
               "policy": {"train_batch_size": 128, "minibatch_size": 64, "num_epochs": 1, "hidden": 8,
                          "users_per_episode": 8, "num_envs_per_env_runner": 8},
               "personas": {"backend": "openai", "model": "fake-model", "k_similar": 0, "rpm": 60000},
               "study": {"sources": ["bias", "mf"], "seeds": 1, "env_steps": 128, "bootstrap": 50}}
        p = tmp_path / "study.yaml"
        p.write_text(yaml.safe_dump(cfg))
        out = tmp_path / "study"
        assert main(["study", "--config", str(p), "--out", str(out), "--quiet", "--num-cpus", "1"]) == 0
        n = srv.count()
    r = json.loads((out / "study.json").read_text())
    assert r["source_names"] == ["bias", "mf", "llm_persona"] and r["fidelity"]["llm_persona"]["method"] == "logprobs"
    assert set(r["sources"]) == {"bias", "mf", "llm_persona"} and "vs_popularity" in r["sources"]["llm_persona"]
    assert r["runs"]["llm_persona"][0]["env_steps"] >= 128 and n > 0
    acc = r["reward_accounting"]["llm_persona"]
    assert acc["answered"] == acc["asked"] >= 128 and acc["failed"] == 0
    assert r["fidelity"]["llm_persona"]["coverage"] == 1
    assert SECRET.encode() not in (out / "study.json").read_bytes()
