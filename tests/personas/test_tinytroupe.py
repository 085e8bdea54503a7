"""The TinyTroupe backend with real TinyTroupe, against the fake server speaking its action schema.

TinyTroupe is optional: these tests skip without it (CI installs it from ../shared/wheels), except
those that need no TinyTroupe (prompt handling, worker routing, the one-line error of a broken install).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from rlsim.personas.backends import BackendSpec
from rlsim.personas.limiter import LocalLimiter, RateLimiter
from rlsim.personas.engine import RatingEngine, rate_units_local
from rlsim.personas.prompts import SYSTEM
from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating
from tests.personas.test_personas import SECRET, assert_correct, cfg_for, make_units

REPO = Path(__file__).resolve().parents[2]
PRICES = {"fake-model": {"prompt": 1.0, "completion": 1.0}}  # $ per 1M tokens


def needs_tinytroupe():
    # Found, not imported (importorskip would import it: a bare import prints a banner and writes a log
    # file into the working directory); the backend imports it quietly.
    if importlib.util.find_spec("tinytroupe") is None:
        pytest.skip("TinyTroupe is not installed (docs/personas.md: The TinyTroupe backend)")


def tt_engine(srv, cfg, budget=None):
    from rlsim.personas.backends.tinytroupe_backend import TinyTroupeBackend

    spec = BackendSpec("tinytroupe", cfg.model, srv.base_url, timeout_s=cfg.timeout_s, api_key=SECRET)
    limiter = RateLimiter(cfg.rpm, cfg.tpm, budget)
    return RatingEngine(spec, cfg, LocalLimiter(limiter), backend=TinyTroupeBackend(spec)), limiter


def requests_per_answer(log) -> int:
    """0.6 asks for the turn's actions at once (TALK, DONE); 0.5 asks once per action."""
    names = {r.schema_name for r in log}
    assert names in ({"CognitiveActionsModel"}, {"CognitiveActionModel"}), names
    return 1 if names == {"CognitiveActionsModel"} else 2


def wait_until(cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)


def rows_of(results) -> pd.DataFrame:
    return pd.DataFrame([r for x in results for r in x["rows"]])


def total(results, key):
    return sum(x["usage"][key] for x in results)


@pytest.fixture(scope="module")
def run():
    """Three users, two batches each, rated once through TinyTroupe; the tests below read what happened."""
    needs_tinytroupe()
    srv = FakeOpenAI(FaultConfig()).start()
    try:
        cfg = cfg_for(backend="tinytroupe")
        engine, limiter = tt_engine(srv, cfg)
        backend = engine.backend
        units = make_units(3, 6, 3)
        results = asyncio.run(rate_units_local(engine, units, 8))
        yield {"units": units, "results": results, "log": list(srv.log), "limiter": limiter, "backend": backend}
    finally:
        srv.stop()


# ---------------------------------------------------------------- without TinyTroupe

def test_prompt_becomes_persona_and_stimulus_and_talk_the_answer():
    from rlsim.personas.backends.tinytroupe_backend import persona_of, stimulus_text, talk_text

    msgs = make_units(1, 2, 2)[0].messages()
    assert persona_of(msgs) == (1, "A viewer number 1.")
    heard = stimulus_text(msgs)
    assert heard.startswith(SYSTEM) and msgs[1]["content"] in heard  # the instructions are not dropped
    assert persona_of([{"role": "user", "content": "User 3. Ratings: ..."}]) == (None, "")
    acts = [{"action": {"type": "THINK", "content": "hmm"}}, {"action": {"type": "TALK", "content": '{"5": 4}'}},
            {"action": {"type": "DONE", "content": ""}}]
    assert talk_text(acts) == '{"5": 4}'


def test_units_of_a_user_meet_one_worker_when_the_backend_remembers():
    from rlsim.personas.workers import worker_slots

    units = make_units(4, 6, 2)  # 3 units per user
    slots = worker_slots(units, 3, by_user=True)
    per_user = {}
    for u, s in zip(units, slots):
        per_user.setdefault(u.user_id, set()).add(s)
    assert all(len(v) == 1 for v in per_user.values())
    assert sorted(s.pop() for s in per_user.values()) == [0, 0, 1, 2]  # users dealt in turn
    assert worker_slots(units, 3, by_user=False) == [j % 3 for j in range(len(units))]


def test_rlsims_own_token_count_tries_tiktoken_once(monkeypatch):
    """TinyTroupe installs tiktoken; offline its encoding download fails. rlsim's estimate (every
    request, on the event loop) must not retry it each time: that stalled the pacing into 429s."""
    from rlsim.personas import prompts

    calls = []

    def refuse(name):
        calls.append(name)
        raise ConnectionError("no network for tiktoken")

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=refuse))
    prompts._encoding.cache_clear()
    try:
        assert [prompts.estimate_tokens("a few words " * 10) for _ in range(50)] == [30] * 50
        assert calls == ["o200k_base"]
    finally:
        prompts._encoding.cache_clear()


@pytest.mark.parametrize("ray_flags", [["--no-ray"], []])
def test_a_broken_install_is_one_line(data_root, cache_root, tmp_path, monkeypatch, capfd, ray_flags):
    from rlsim.cli import main
    from rlsim.personas.backends import tinytroupe_backend

    monkeypatch.setitem(sys.modules, "tinytroupe", None)  # `import tinytroupe` raises ImportError
    monkeypatch.setattr(tinytroupe_backend, "_TT", None)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    rc = main(["personas", "rate", "--backend", "tinytroupe", "--dataset", "ml-100k", "--split", "u1",
               "--data-dir", str(data_root), "--cache-dir", str(cache_root), "--no-download", "--users", "2",
               "--quiet", *ray_flags, "--out", str(tmp_path / "r")])
    err = capfd.readouterr().err
    assert rc == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlsim: error: the tinytroupe backend cannot load TinyTroupe"), err
    assert "pip install git+https://github.com/microsoft/TinyTroupe.git@" in lines[0]


# ---------------------------------------------------------------- with TinyTroupe

def test_fake_server_answers_in_the_schema_tinytroupe_validates():
    needs_tinytroupe()
    from rlsim.personas.backends.tinytroupe_backend import load_tinytroupe

    load_tinytroupe()
    import tinytroupe.agent

    # 0.6 asks for a sequence of actions per turn, 0.5 (and 0.6 optionally) for one action per request.
    models = [getattr(tinytroupe.agent, n) for n in ("CognitiveActionsModel", "CognitiveActionModel")
              if hasattr(tinytroupe.agent, n)]
    stimulus = {"stimuli": [{"type": "CONVERSATION", "content": "Profile of user 2: x\n7: Film 7\n9: Film 9"}]}
    with FakeOpenAI(FaultConfig()) as srv:
        for model in models:
            rf = {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": model.model_json_schema()}}
            body = {"model": "m", "response_format": rf,
                    "messages": [{"role": "user", "content": json.dumps(stimulus)}]}
            req = urllib.request.Request(srv.base_url + "/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            content = json.loads(urllib.request.urlopen(req).read())["choices"][0]["message"]["content"]
            answer = model.model_validate_json(content)
            talk = answer.actions[0] if hasattr(answer, "actions") else answer.action
            assert talk.type == "TALK" and json.loads(talk.content) == {"7": expected_rating(2, 7),
                                                                        "9": expected_rating(2, 9)}


def test_ratings_reach_their_user_and_item(run):
    rows = rows_of(run["results"])
    assert len(rows) == 18 and (rows["status"] == "ok").all(), rows[rows["status"] != "ok"]
    assert_correct(rows)
    # Each request asked only for its batch: the items remembered from earlier batches are not rated again.
    asked = sorted((r.user_id, tuple(r.item_ids)) for r in run["log"])
    per_answer = requests_per_answer(run["log"])
    assert asked == sorted((u.user_id, tuple(u.item_ids)) for u in run["units"] for _ in range(per_answer))


def test_usage_counts_every_request_the_server_received(run):
    log, res = run["log"], run["results"]
    assert total(res, "requests") == len(log) == run["limiter"].granted  # the limiter saw each one
    assert total(res, "prompt_tokens") == sum(r.prompt_tokens for r in log)
    assert total(res, "completion_tokens") == sum(r.completion_tokens for r in log)
    # TinyTroupe's agent prompt is far larger than rlsim's own: counted as sent, not as rlsim wrote it.
    assert min(r.prompt_chars for r in log) > 10 * max(len(m["content"]) for u in run["units"] for m in u.messages())


def test_one_agent_per_user_remembers_its_earlier_batches(run):
    backend = run["backend"]
    assert sorted(backend.agents) == [1, 2, 3]
    for uid in (1, 2, 3):
        first, second = [u for u in run["units"] if u.user_id == uid]
        later = [r for r in run["log"] if r.user_id == uid and r.item_ids == second.item_ids]
        assert len(later) == requests_per_answer(run["log"])
        for r in later:  # the second batch's prompt carries the first batch, and its answer
            for i in first.item_ids:
                assert f"{i}: Film {i}" in r.prompt_text and f'"{i}": {expected_rating(uid, i)}' in r.prompt_text
            assert all(f"Profile of user {o}:" not in r.prompt_text for o in (1, 2, 3) if o != uid)


def test_the_system_message_reaches_the_prompt_the_server_receives(run):
    assert all(r.stimulus.startswith(SYSTEM) for r in run["log"])


def test_an_answer_reports_every_request_behind_it():
    """Used without the engine's gate, ChatResult still carries all the requests and tokens sent."""
    needs_tinytroupe()
    from rlsim.personas.backends.tinytroupe_backend import TinyTroupeBackend

    with FakeOpenAI(FaultConfig()) as srv:
        backend = TinyTroupeBackend(BackendSpec("tinytroupe", "fake-model", srv.base_url, api_key=SECRET))
        unit = make_units(1, 3, 3)[0]
        res = asyncio.run(backend.chat(unit.messages(), None, {"temperature": 0.0, "max_tokens": 300}))
        log = list(srv.log)
    assert json.loads(res.text) == {str(i): expected_rating(1, i) for i in unit.item_ids}
    assert res.requests == len(log) == requests_per_answer(log)
    assert (res.prompt_tokens, res.completion_tokens) == (sum(r.prompt_tokens for r in log),
                                                          sum(r.completion_tokens for r in log))


def test_profile_instructions_reach_a_one_off_agent():
    """Psych / Lusifer profiles go through engine.complete: their system prompt is what the agent hears."""
    needs_tinytroupe()
    from rlsim.personas.prompts import SUMMARY_SCHEMA, summary_messages

    answer = json.dumps({"summary": "Likes slow dramas."})
    with FakeOpenAI(FaultConfig(answer_text=answer)) as srv:
        cfg = cfg_for(backend="tinytroupe")
        engine, limiter = tt_engine(srv, cfg)
        msgs = summary_messages("", ["Film 1 (1990): 4", "Film 2 (1991): 2"])
        text, why = asyncio.run(engine.complete(msgs, SUMMARY_SCHEMA))  # (text, failure reason)
        log = list(srv.log)
    assert json.loads(text) == {"summary": "Likes slow dramas."} and why == ""
    assert log[-1].stimulus.startswith(msgs[0]["content"]) and "Film 2 (1991): 2" in log[-1].stimulus
    assert engine.backend.agents == {}  # not a user's rating prompt: no agent is kept
    assert limiter.granted == len(log) == requests_per_answer(log)


@pytest.mark.parametrize("faults,reason", [({"p_500": 1.0}, "http_500"),
                                           ({"p_429": 1.0, "retry_after_s": 0.01}, "http_429"),
                                           ({"p_timeout": 1.0, "timeout_sleep_s": 0.6}, "timeout"),
                                           ({"p_malformed": 1.0}, "tinytroupe_invalid_action"),
                                           ({"p_truncated": 1.0}, "tinytroupe_invalid_action")])
def test_failures_are_retried_by_rlsim_only(faults, reason):
    needs_tinytroupe()
    with FakeOpenAI(FaultConfig(**faults)) as srv:
        cfg = cfg_for(backend="tinytroupe", max_retries=2, timeout_s=0.3)
        engine, limiter = tt_engine(srv, cfg)
        res = asyncio.run(rate_units_local(engine, make_units(1, 3, 3), 1))
        rows = rows_of(res)
        assert (rows["status"] == "failed").all() and (rows["reason"] == reason).all()
        # One request per rlsim attempt: TinyTroupe's own retries (and their waits) never happen.
        assert total(res, "requests") == limiter.granted == 3
        assert res[0]["usage"]["errors"] == {reason: 3}
        wait_until(lambda: len(srv.log) >= 3)  # a timed-out request is logged when its handler wakes
        assert len(srv.log) == 3


def test_an_answer_like_the_agents_last_one_is_not_replaced_by_done():
    """TinyTroupe turns an action too like the agent's last one (character Jaccard > 0.85) into DONE; two JSON
    answers of one user often are. Each question of rlsim's agents gets its answer."""
    needs_tinytroupe()
    from rlsim.personas.grounding import WorkUnit

    with FakeOpenAI(FaultConfig()) as srv:
        srv.set_persona({(1, 12): 4.0, (1, 21): 4.0})  # both batches answer {"12": 3, "21": 3} in some order
        engine, _ = tt_engine(srv, cfg_for(backend="tinytroupe", max_retries=0))
        items = {i: {"item_id": i, "title": f"Film {i}", "year": 1990, "genres": "Drama"} for i in (12, 21)}
        units = [WorkUnit(1, ids, "A viewer.", [items[i] for i in ids], {}, (1.0, 5.0, 1.0))
                 for ids in ([12, 21], [21, 12])]
        rows = rows_of(asyncio.run(rate_units_local(engine, units, 1)))
    assert len(rows) == 4 and (rows["status"] == "ok").all() and (rows["rating"] == 3.0).all()


def test_a_failed_answer_leaves_no_trace_in_the_agents_memory():
    needs_tinytroupe()
    with FakeOpenAI(FaultConfig()) as srv:
        cfg = cfg_for(backend="tinytroupe", max_retries=0)
        engine, _ = tt_engine(srv, cfg)
        backend = engine.backend
        first, second, third = make_units(1, 9, 3)

        async def go():
            a = await engine.rate_unit(first)
            srv.set_faults(p_500=1.0)
            b = await engine.rate_unit(second)
            srv.set_faults(p_500=0.0)
            return a, b, await engine.rate_unit(third)

        a, b, c = asyncio.run(go())
        assert [x["rows"][0]["status"] for x in (a, b, c)] == ["ok", "failed", "ok"]
        last = srv.log[-1].prompt_text
        assert "Film 101" in last and "Film 110" not in last  # batch 2 was rolled back out of memory
        heard = [m for m in backend.agents[1].episodic_memory.retrieve_all() if m.get("type") == "stimulus"]
        assert len(heard) == 2


def test_budget_caps_what_tinytroupe_really_sends():
    needs_tinytroupe()
    with FakeOpenAI(FaultConfig()) as srv:
        cfg = cfg_for(backend="tinytroupe", max_concurrency=1, prices=PRICES)
        # Each request reserves its worst case (every byte of TinyTroupe's ~22 kB body, max_tokens): about
        # $0.025 here, while it bills ~$0.006 (~5.6k prompt tokens); this cap lets two through.
        budget = 0.035
        engine, limiter = tt_engine(srv, cfg, budget)
        res = asyncio.run(rate_units_local(engine, make_units(1, 15, 3), 1))
        rows = rows_of(res)
        spent = sum((r.prompt_tokens + r.completion_tokens) * 1.0 / 1e6 for r in srv.log)
        assert 1 <= len(srv.log) < 5 and spent <= budget
        assert total(res, "cost_usd") == pytest.approx(spent) == pytest.approx(limiter.budget.spent_usd)
        assert set(rows.loc[rows["status"] != "ok", "reason"]) == {"budget"}


@pytest.mark.parametrize("faults,charged", [({"p_timeout": 1.0, "timeout_sleep_s": 0.6}, True), ({"p_500": 1.0}, False)])
def test_a_timed_out_request_counts_at_its_estimate_a_refused_one_costs_nothing(faults, charged):
    """As for the openai backend (the same gate): a timeout may have been answered and billed."""
    needs_tinytroupe()
    with FakeOpenAI(FaultConfig(**faults)) as srv:
        cfg = cfg_for(backend="tinytroupe", max_retries=1, timeout_s=0.3, prices=PRICES)
        engine, limiter = tt_engine(srv, cfg, budget=1.0)
        res = asyncio.run(rate_units_local(engine, make_units(1, 3, 3), 1))
    st = limiter.job_stats()
    assert total(res, "requests") == limiter.granted == 2 and st["reserved_usd"] == 0.0
    assert total(res, "cost_usd") == pytest.approx(st["spent_usd"])
    if charged:  # each at its estimate: TinyTroupe's whole prompt (thousands of tokens), not rlsim's
        assert st["spent_usd"] > 2 * 1000 / 1e6
    else:
        assert st["spent_usd"] == 0.0


def test_tokens_are_counted_without_tiktoken(monkeypatch):
    """TinyTroupe counts every request's tokens with tiktoken (a download when offline): never called."""
    needs_tinytroupe()
    import tiktoken

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("no network for tiktoken")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    monkeypatch.setattr(tiktoken, "encoding_for_model", refuse)
    with FakeOpenAI(FaultConfig()) as srv:
        cfg = cfg_for(backend="tinytroupe")
        engine, limiter = tt_engine(srv, cfg)
        res = asyncio.run(rate_units_local(engine, make_units(1, 3, 3), 1))
    assert calls == []
    assert (rows_of(res)["status"] == "ok").all()


def test_import_is_quiet_and_writes_no_log_file(tmp_path):
    """A fresh interpreter (TinyTroupe is imported once per process): import, build, rate one unit."""
    needs_tinytroupe()
    script = f"""
import asyncio, json, logging, sys
logging.getLogger().setLevel(logging.WARNING)
before = (logging.getLogger().level, len(logging.getLogger().handlers), "." in sys.path)
sys.path.insert(0, {str(REPO)!r})
from tests.fake_openai import FakeOpenAI, FaultConfig
from tests.personas.test_personas import make_units, cfg_for
from rlsim.personas.backends import BackendSpec
from rlsim.personas.limiter import LocalLimiter, RateLimiter
from rlsim.personas.engine import RatingEngine, rate_units_local
with FakeOpenAI(FaultConfig()) as srv:
    cfg = cfg_for(backend="tinytroupe")
    eng = RatingEngine(BackendSpec("tinytroupe", "fake-model", srv.base_url, api_key="k"), cfg,
                       LocalLimiter(RateLimiter(cfg.rpm, cfg.tpm)))
    res = asyncio.run(rate_units_local(eng, make_units(1, 3, 3), 2))
after = (logging.getLogger().level, len(logging.getLogger().handlers), "." in sys.path)
sys.stdout.write(json.dumps({{"ok": [r["status"] for r in res[0]["rows"]], "same": before == after}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout) == {"ok": ["ok"] * 3, "same": True}  # no banner, no configuration dump
    assert r.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no tinytroupe.<time>.log, no config.ini


@pytest.mark.slow
def test_cli_evaluate_with_tinytroupe_through_the_ray_pool(data_root, cache_root, tmp_path):
    """Two Ray workers: each user's batches meet one agent; usage equals what the server received."""
    needs_tinytroupe()
    with FakeOpenAI(FaultConfig()) as srv:
        env = {**os.environ, "OPENAI_BASE_URL": srv.base_url, "OPENAI_API_KEY": SECRET, "PYTHONPATH": str(REPO)}
        out = tmp_path / "tt"
        cmd = [sys.executable, "-m", "rlsim.cli", "personas", "evaluate", "--backend", "tinytroupe",
               "--dataset", "ml-100k", "--split", "u1", "--data-dir", str(data_root), "--cache-dir", str(cache_root),
               "--no-download", "--no-cache", "--model", "fake-model", "--users", "4", "--workers", "2",
               "--batch-size", "3", "--max-retries", "6", "--rpm", "6000", "--quiet", "--out", str(out)]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        m = json.loads((out / "metrics.json").read_text())
        pairs = pd.read_parquet(out / "pairs.parquet")
        log = list(srv.log)
    assert m["coverage"] == 1.0
    assert (pairs["predicted"] == [expected_rating(u, i) for u, i in zip(pairs["user_id"], pairs["item_id"])]).all()
    assert m["usage"]["requests"] == len(log) and m["usage"]["prompt_tokens"] == sum(r.prompt_tokens for r in log)
    later = 0
    for uid in pairs["user_id"].unique():  # every later batch of a user remembers the first one
        ok = [r for r in log if r.user_id == uid and r.status == 200]
        first = re.compile(rf"(?m)^\s*{ok[0].item_ids[0]}: ")
        assert all(first.search(r.prompt_text) for r in ok[1:])
        later += len(ok) - 1
    assert later > 0
    assert "Traceback" not in r.stderr and "DISCLAIMER" not in r.stdout + r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert not list(tmp_path.glob("tinytroupe.*.log"))
