"""Budget and pacing guarantees that hold when the server disagrees with the client (issue 17, part A).

Unit tests on a fake clock for the limiter (pauses, overruns, forgotten jobs, endpoint names), the
worst case of a request, and short runs against every hostile mode of tests/fake_openai.py
(tests/hostile.py): spend under the cap, requests and tokens per window within the limits, no
rating lost or duplicated.
"""

from __future__ import annotations

import asyncio

import pytest

from rlsim.personas.backends import BackendSpec, TransientError
from rlsim.personas.cost import cost_usd
from rlsim.personas.gate import LimiterGate, request_bound
from rlsim.personas.limiter import BUSY, KEEP_JOBS, REFUSED, LocalLimiter, RateLimiter, limiter_name
from rlsim.personas.engine import RatingEngine
from rlsim.personas.job import dry_run
from rlsim.personas.usage import empty_usage
from tests.fake_openai import FakeOpenAI, FaultConfig
from tests.hostile import MODES, PRICES, billed_usd, cfg_for_mode, max_in_window, run_mode
from tests.personas.test_personas import make_units

SECRET = "sk-hostile-do-not-leak-7"


# ---------------------------------------------------------------- the limiter, on a fake clock

def test_a_pause_paces_reservations_from_its_end():
    t = [0.0]
    lim = RateLimiter(rpm=600, tpm=1e9, clock=lambda: t[0])
    lim.pause(30.0)
    # Before: all eight got 30.0 and went out together when the pause ended.
    assert [lim.reserve(1) for _ in range(8)] == pytest.approx([30.0 + 0.1 * k for k in range(8)])
    t[0] = 31.0  # after the pause the pacing goes on where it was
    assert lim.reserve(1) == pytest.approx(0.0)
    lim2 = RateLimiter(rpm=1e6, tpm=600, clock=lambda: t[0])  # tokens too: 10 per second from the end
    lim2.pause(5.0)
    assert [lim2.reserve(50) for _ in range(3)] == pytest.approx([5.0, 10.0, 15.0])


def test_spend_above_the_reservation_is_recorded_counted_and_stops_the_job():
    # The example: cap $0.001, grants of $0.0002 each settled at $0.0006.
    lim = RateLimiter(rpm=1e6, tpm=1e9, budget_usd=0.001, clock=lambda: 0.0)
    granted = 0
    for _ in range(5):
        if lim.reserve(1, 0.0002) < 0:
            break
        granted += 1
        lim.settle(0.0002, 0.0006)
    st = lim.job_stats()
    assert granted == 2 and st["overruns"] == 2  # counted, and nothing granted once at/over the cap
    assert st["spent_usd"] == pytest.approx(0.0012)  # the true spend is never hidden
    assert lim.reserve(1, 0.0) == REFUSED


def test_in_flight_reservations_make_a_request_wait_not_fail():
    lim = RateLimiter(rpm=1e6, tpm=1e9, budget_usd=1.0, clock=lambda: 0.0)
    assert lim.reserve(1, 0.6) >= 0
    assert lim.reserve(1, 0.6) == BUSY  # fits once the first settles (a worst case mostly comes back)
    lim.settle(0.6, 0.1)
    assert lim.reserve(1, 0.6) >= 0
    assert lim.reserve(1, 0.95) == REFUSED  # 0.1 spent + 0.95 > 1.0 whatever settles


def test_a_send_time_is_committed_only_near_against_worst_cases():
    t = [0.0]
    lim = RateLimiter(rpm=1e6, tpm=600, clock=lambda: t[0])  # 10 tokens/s
    assert lim.try_reserve(100) == ("ok", 0.0)  # a worst case of 100 tokens
    status, retry = lim.try_reserve(100)
    assert status == "later" and 0 < retry <= 0.5  # 10 s away against the worst case: ask again soon
    lim.settle(0.0, 0.0, 100, 10)  # it used 10: 90 come back
    assert lim.try_reserve(100) == ("ok", pytest.approx(1.0))  # paced by what was used, not by 100


def test_a_request_waits_for_the_budget_held_in_flight():
    from rlsim.personas.limiter import sleep_until_allowed

    lim = LocalLimiter(RateLimiter(rpm=1e6, tpm=1e9, budget_usd=1.0))

    async def go():
        assert await sleep_until_allowed(lim, 1, 0.6)

        async def settle_soon():
            await asyncio.sleep(0.1)
            await lim.settle(0.6, 0.1)

        task = asyncio.ensure_future(settle_soon())
        ok = await sleep_until_allowed(lim, 1, 0.6)  # BUSY until the first settles, then granted
        await task
        stuck = await sleep_until_allowed(lim, 1, 0.6, busy_wait_s=0.1)  # 0.1 + 0.6 in flight: never settles
        return ok, stuck

    assert asyncio.run(go()) == (True, False)


def test_an_idle_job_with_a_budget_is_never_forgotten():
    t = [0.0]
    lim = RateLimiter(clock=lambda: t[0], lease_s=120)
    lim.register("capped", rpm=600, tpm=1e6, budget_usd=1.0)
    lim.register("spent", rpm=600, tpm=1e6)
    assert lim.reserve(1, 0.9, job="capped") >= 0
    lim.settle(0.9, 0.9, job="capped")
    lim.reserve(1, 0.5, job="spent")
    lim.settle(0.5, 0.5, job="spent")
    t[0] += 200.0  # both idle past their lease
    for k in range(KEEP_JOBS + 50):
        lim.register(f"other-{k}", rpm=600, tpm=1e6)
        t[0] += 1.0  # earlier ones finish (their lease runs out)
    assert lim.reserve(1, 0.2, job="capped") == REFUSED  # before: recreated uncapped at $0 and granted
    assert lim.job_stats("spent")["spent_usd"] == pytest.approx(0.5)
    assert len(lim.jobs) <= KEEP_JOBS + 1  # jobs with nothing to remember are still forgotten


def test_one_limiter_per_endpoint_however_it_is_written():
    same = ["http://127.0.0.1:8000/v1", "http://localhost:8000", "HTTP://LOCALHOST:8000/v1/",
            "http://[::1]:8000/v1/", "http://localhost:8000/"]
    assert len({limiter_name(u, "m") for u in same}) == 1
    assert limiter_name(None, "m") == limiter_name("https://api.openai.com:443/v1/", "m")
    assert limiter_name("http://localhost:8001/v1", "m") != limiter_name("http://localhost:8000/v1", "m")
    assert limiter_name("http://localhost:8000/v1", "m") != limiter_name("http://localhost:8000/v1", "m2")
    from rlsim.errors import ConfigError

    with pytest.raises(ConfigError, match="invalid endpoint URL"):
        limiter_name("http://localhost:80a0/v1", "m")


# ---------------------------------------------------------------- the worst case of a request

def test_the_worst_case_is_derived_from_what_is_sent():
    msgs = [{"role": "system", "content": "é" * 10}, {"role": "user", "content": "abc"}]
    p, c = request_bound(msgs, {"max_tokens": 300, "n": 3})
    assert c == 900  # every completion may run to max_tokens (reasoning tokens count inside it)
    assert p >= 20 + 3  # every UTF-8 byte may be a token
    p2, _ = request_bound(msgs, {"max_tokens": 300}, {"type": "json_schema", "json_schema": {"name": "x" * 50}})
    assert p2 >= p + 50  # the schema goes into the prompt
    with pytest.raises(ValueError, match="max_tokens"):
        request_bound(msgs, {"temperature": 0.0})


def test_the_gate_charges_the_worst_case_without_usage_and_after_a_timeout():
    prices = {"m": {"prompt": 1e6, "completion": 1e6}}  # $1 per token
    lim = RateLimiter(rpm=1e6, tpm=1e9, budget_usd=1e6, clock=lambda: 0.0)
    usage = empty_usage()
    gate = LimiterGate(LocalLimiter(lim), prices, "m", usage)

    async def go():
        r = await gate.acquire(500, 300)
        await gate.release(r, None, None)  # no usage in the answer: its worst case
        r = await gate.acquire(500, 300)
        await gate.release(r, error=TransientError("timeout"))

    asyncio.run(go())
    assert lim.budget.spent_usd == pytest.approx(1600.0) and usage["cost_usd"] == pytest.approx(1600.0)


def _engine(srv, **kw):
    cfg = cfg_for_mode(rpm=1e6, tpm=1e9, budget=kw.pop("budget", None), **kw)
    spec = BackendSpec("openai", "fake-model", srv.base_url, timeout_s=cfg.timeout_s, api_key=SECRET)
    return RatingEngine(spec, cfg, LocalLimiter(RateLimiter(cfg.rpm, cfg.tpm, cfg.budget_usd)))


def test_summaries_reserve_the_max_tokens_they_send():
    msgs = [{"role": "user", "content": "Summarise the viewer in one line."}]
    p, c = request_bound(msgs, {"max_tokens": 600})
    worst = cost_usd(PRICES, "fake-model", p, c)
    budget = 2.5 * worst
    with FakeOpenAI(FaultConfig(fill_max_tokens=True, answer_text='{"summary": "A viewer."}')) as srv:
        eng = _engine(srv, budget=budget, max_concurrency=1)

        async def go():
            out = [await eng.complete(msgs, None, answer_index=k) for k in range(6)]
            await eng.aclose()
            return out

        got = asyncio.run(go())
        # Before: 300 tokens reserved, 600 billed, six answers: the cap crossed twice over.
        assert billed_usd(srv) <= budget + 1e-9
        assert [r for _, r in got].count("budget") >= 1 and got[0][1] == ""


def test_a_timed_out_request_counts_its_worst_case():
    msgs = [{"role": "user", "content": "Rate movie 1."}]
    with FakeOpenAI(FaultConfig(p_timeout=1.0, timeout_sleep_s=1.0)) as srv:
        eng = _engine(srv, max_retries=0, timeout_s=0.3)
        usage = empty_usage()

        async def go():
            out = await eng.complete(msgs, None, usage)
            await eng.aclose()
            return out

        assert asyncio.run(go()) == ("", "timeout")
    p, c = request_bound(msgs, {"max_tokens": 600})
    assert usage["cost_usd"] == pytest.approx(cost_usd(PRICES, "fake-model", p, c))


# ---------------------------------------------------------------- every hostile mode, three properties

WINDOW_S, RPM, TPM = 3.0, 600.0, 1_000_000.0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_hostile_mode_keeps_budget_pacing_and_ratings(mode, tmp_path):
    units = make_units(16, 15, 3)  # 80 requests of ~$0.16 (as the client estimates them)
    worst = dry_run(units, BackendSpec("openai", "fake-model"), cfg_for_mode(RPM, TPM, None))
    budget = 8 * worst["request_worst_case_usd"]  # $9.6: every mode's run would cross it
    r = run_mode(mode, units, tmp_path / mode, RPM, budget, WINDOW_S, TPM)
    assert r["billed_usd"] > 0 and r["budget_overrun_usd"] == 0.0, r
    assert r["stopped_by_budget"] > 0, r  # the cap was reached: the guard was tested
    per_window = RPM * WINDOW_S / 60
    assert r["max_requests_in_window"] <= per_window + 1 + 2, r  # + the limiter's one, + 2 for loop jitter
    assert r["max_billed_tokens_in_window"] <= TPM * WINDOW_S / 60 + 2 * worst["request_worst_case_usd"] / 1e-3, r
    assert r["lost"] == 0 and r["duplicated"] == 0, r


def test_max_in_window():
    assert max_in_window([0.0, 0.5, 0.9, 1.0, 1.4, 3.0], 1.0) == 4  # [0.5, 1.5)
    assert max_in_window([0.0, 1.0], 1.0, [5.0, 7.0]) == 7.0
    assert max_in_window([], 1.0) == 0.0


def test_a_rerun_of_the_llm_simulator_finds_its_earlier_spend(tmp_path):
    from rlsim.simulators.llm_build import simulator_job, simulator_limiter

    spec = BackendSpec("openai", "fake-model", "http://localhost:9/v1", api_key=SECRET)
    pcfg = cfg_for_mode(600, 1e9, 1.0)
    job = simulator_job(spec, {"method": "logprobs"}, 0, str(tmp_path))
    assert job == simulator_job(spec, {"method": "logprobs"}, 0, str(tmp_path))  # before: a fresh id per run
    assert job != simulator_job(spec, {"method": "samples"}, 0, str(tmp_path))
    # Options added later (the page choice's) name the same job at their defaults, another when changed:
    # an upgrade keeps the spend an earlier run recorded.
    from dataclasses import asdict

    from rlsim.simulators.llm_build import LATER_OPTIONS
    from rlsim.simulators.llm_config import LLMSimConfig

    full = asdict(LLMSimConfig())
    assert {k: full[k] for k in LATER_OPTIONS} == LATER_OPTIONS  # the table follows the config's defaults
    before = {k: v for k, v in full.items() if k not in LATER_OPTIONS}
    assert simulator_job(spec, full, 0, str(tmp_path)) == simulator_job(spec, before, 0, str(tmp_path))
    assert simulator_job(spec, {**full, "page_size": 8}, 0, str(tmp_path)) != simulator_job(spec, before, 0, str(tmp_path))
    ledger = tmp_path / "personas" / "budgets" / f"{job}.json"

    async def spend(lim):
        assert await lim.reserve(10, 0.7) >= 0
        await lim.settle(0.7, 0.6)

    lim, info, on_close = simulator_limiter(pcfg, spec, job, ledger)
    asyncio.run(spend(lim))
    if on_close is not None:
        asyncio.run(on_close())
    again, info, _ = simulator_limiter(pcfg, spec, job, ledger)  # the rerun: $0.6 of its $1 already spent
    assert info["job"] == job and info["spent_before_usd"] == pytest.approx(0.6)
    assert asyncio.run(again.reserve(10, 0.5)) == REFUSED
    assert SECRET not in ledger.read_text()
