"""LLM personas choose what to watch (rlsim.simulators.llm_choice), against the fake OpenAI server: one
Agent4Rec page per (user, session), P(watch) from logprobs / samples / the plain answer, the cache, the
budget, the not-shown rule, failures as NaN with reasons, and PPO with reward engagement."""

from __future__ import annotations

import numpy as np
import pytest

from rlsim.personas.cache import ResponseCache
from rlsim.simulators.base import Session
from tests.fake_openai import FakeOpenAI, FaultConfig, watch_probability
from tests.test_llm_simulator import SECRET, make_sim, train_llm_policy

USERS = np.array([1, 1, 1, 1, 1, 2])
ITEMS = np.array([5, 3, 9, 7, 11, 4])
WANT = np.array([watch_probability(int(u), int(i)) for u, i in zip(USERS, ITEMS)])


@pytest.fixture
def server():
    srv = FakeOpenAI(FaultConfig()).start()
    yield srv
    srv.stop()


def pages(server):
    return [r.item_ids for r in server.log if r.schema_name == "page_choice"]


def assert_accounted(sim):
    st = sim.stats()["page_choice"]
    assert st["requested"] == st["answered"] + st["failed"]
    assert st["failed"] == sum(st["failed_by_reason"].values())


def test_logprobs_give_the_server_probabilities_one_request_per_page(server):
    sim = make_sim(server)
    p, why = sim.choice_with_reasons(USERS, ITEMS)
    np.testing.assert_allclose(p, WANT, atol=1e-9)
    assert why == [""] * 6
    # User 1's five movies: pages of four by id (3, 5, 7, 9 | 11); user 2's one: three requests in all.
    assert sorted(pages(server)) == [[3, 5, 7, 9], [4], [11]]
    st = sim.stats()
    assert st["page_choice"]["answered_by_method"] == {"logprobs": 6} and sim.choice_model.method == "logprobs"
    assert st["usage"]["choice"]["requests"] == 3 and st["requests_sent"] == 3  # counted in the total
    assert sim.describe()["choice"] == "llm_page" and sim.describe()["choice_method"] == "logprobs"
    assert_accounted(sim)


def test_a_page_does_not_depend_on_the_order_asked_and_comes_from_the_cache(server, tmp_path):
    cache = ResponseCache(str(tmp_path / "c.sqlite"))
    first = make_sim(server, cache=cache).choice(USERS, ITEMS)
    sent = server.count()
    order = np.array([4, 0, 2, 5, 1, 3])
    again = make_sim(server, cache=ResponseCache(str(tmp_path / "c.sqlite")))
    np.testing.assert_allclose(again.choice(USERS[order], ITEMS[order]), first[order], atol=1e-12)
    assert server.count() == sent  # the same pages: no second request
    st = again.stats()
    assert st["page_choice"]["from_cache"] == 6 and st["usage"]["choice"]["cached_requests"] == 3
    # and within one simulator the same page asked again is not sent again either (no cache)
    sim = make_sim(server)
    sim.choice(USERS, ITEMS)
    n = server.count()
    sim.choice(USERS, ITEMS)
    assert server.count() == n and sim.stats()["page_choice"]["from_memo"] == 6


def test_without_logprobs_the_share_of_yes_among_samples(server):
    server.set_faults(logprobs_supported=False)
    sim = make_sim(server, samples=8, smoothing=0.5)
    p = sim.choice(USERS, ITEMS)
    assert sim.choice_model.method == "samples"
    # each P is (yes + 0.25) / (8 + 0.5) for some count of yes among the 8 completions
    k = p * 8.5 - 0.25
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)
    assert ((p > 0) & (p < 1)).all()
    # High and low server probabilities stay apart (seeded draws: fixed answers).
    assert p[WANT >= 0.7].min() > p[WANT <= 0.1].max()
    logged = [r for r in server.log if r.schema_name == "page_choice"]
    # The three pages went out together asking logprobs (ignored), then by samples.
    assert [r.n_choices for r in logged].count(1) == 3 and [r.n_choices for r in logged].count(8) == 3
    # auto: the endpoint is not asked for logprobs again; the next pages go by samples at once
    sim.choice(USERS, ITEMS + 20)
    assert [r.n_choices for r in server.log[len(logged):]] == [8, 8, 8]


def test_without_logprobs_or_samples_the_plain_answer_smoothed(server):
    server.set_faults(logprobs_supported=False, n_supported=False)
    sim = make_sim(server, choice_epsilon=0.05)
    p = sim.choice(USERS, ITEMS)
    np.testing.assert_allclose(p, np.where(WANT >= 0.5, 0.95, 0.05))
    assert sim.choice_model.method == "answer"
    assert sim.stats()["page_choice"]["answered_by_method"] == {"answer": 6}
    # Per page: logprobs asked (ignored), n asked (ignored), then the answers already read are the plain
    # answer: no third request. Later pages are asked once, plainly.
    assert sim.stats()["usage"]["choice"]["requests"] == 6
    sim.choice(USERS, ITEMS + 20)
    assert sim.stats()["usage"]["choice"]["requests"] == 9
    assert_accounted(sim)


def test_a_point_mass_at_the_answer_token_asks_that_page_by_samples(server):
    server.set_faults(logprobs_alternatives="token")
    sim = make_sim(server)
    p = sim.choice(USERS[:4], ITEMS[:4])
    assert sim.stats()["page_choice"]["answered_by_method"] == {"samples": 4}
    assert not np.isin(p, [0.0, 1.0]).any()  # never a one-hot answer labelled a probability


def test_a_movie_already_shown_in_the_session_is_not_picked_nor_asked(server):
    sim = make_sim(server)
    s = Session((5, 20), (4.0, 2.0))
    p = sim.choice(np.array([1, 1]), np.array([5, 3]), [s, s])
    assert p[0] == 0.0 and p[1] == pytest.approx(watch_probability(1, 3))
    assert pages(server) == [[3]]  # only the unseen movie reached the endpoint
    msgs = server.log[-1].messages_text
    assert "In this session you were shown, in order: Film 5 (1990) [Drama] — you rated 4" in msgs
    assert sim.stats()["page_choice"]["not_shown"] == 1


def test_a_dynamic_users_page_carries_its_updated_summary(server):
    sim = make_sim(server, summary_every=1)
    sim.choice(np.array([1]), np.array([3]), [Session((5,), (2.0,))])
    page = next(r for r in server.log if r.schema_name == "page_choice")
    assert "Your tastes as they stand now, updated during this session: Summary " in page.messages_text
    st = sim.stats()
    assert st["summary_updates"] == 1 and st["usage"]["summaries"]["requests"] == 1
    assert st["requests_sent"] == 2  # the summary and the page


def test_the_budget_fails_choices_with_a_reason_never_a_guess(server):
    sim = make_sim(server, budget=1e-7)
    p, why = sim.choice_with_reasons(USERS, ITEMS)
    assert np.isnan(p).all() and why == ["budget"] * 6 and server.count() == 0
    st = sim.stats()["page_choice"]
    assert st["failed_by_reason"] == {"budget": 6} and st["answered"] == 0
    # the outcome of a failed choice is a NaN row too
    assert np.isnan(sim.outcome(USERS[:1], ITEMS[:1])[0, 0])


def test_malformed_page_answers_are_retried_then_fail_with_a_reason(server):
    server.set_faults(p_malformed=1.0)
    sim = make_sim(server)
    p, why = sim.choice_with_reasons(USERS[:2], ITEMS[:2])
    assert np.isnan(p).all() and why == ["malformed_json"] * 2
    assert server.count() == sim.pcfg.max_retries + 1  # one page, asked until max_retries
    assert_accounted(sim)


def test_outcome_is_the_page_choice_times_the_rating_distribution(server):
    sim = make_sim(server)
    o = sim.outcome(USERS, ITEMS)
    np.testing.assert_allclose(o[:, 0], 1 - WANT, atol=1e-9)
    np.testing.assert_allclose(o[:, 1:], WANT[:, None] * sim.distribution(USERS, ITEMS), atol=1e-9)


def test_policy_train_with_reward_engagement_against_the_llm_persona(tmp_path, data_root, cache_root,
                                                                     monkeypatch):
    """One PPO iteration, the LLM persona hosted in the simulator actor choosing through its pages."""
    with FakeOpenAI(FaultConfig()) as srv:
        _, _, run, tm = train_llm_policy(tmp_path, data_root, cache_root, monkeypatch, srv,
                                         policy={"reward": "engagement", "reward_mode": "sampled"})
        sim = tm["simulator"]["simulator"]
        pc = sim["page_choice"]
        assert sim["choice"] == "llm_page" and pc["method"] == "logprobs" and pc["failed"] == 0
        assert pc["requested"] == pc["answered"] >= 64 and sim["usage"]["choice"]["requests"] > 0
        acc = tm["reward_accounting"]
        assert acc["shown"] == pc["requested"] and 0 < acc["watch_rate"] < 1 and acc["failed"] == 0
        assert acc["answered"] == sim["requested"]  # only the watched movies were rated
        assert any(r.schema_name == "page_choice" for r in srv.log)
    for f in run.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
