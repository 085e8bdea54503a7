"""`rlsim personas align`: alignment from demonstrations, end to end against the test server.

The server answers as a scripted persona (tests/fake_openai.py ``ScriptedPersona``) that knows each
user's real ratings, rates one point below them until its prompt holds the lesson it writes when shown
its errors, and rates exactly after: so fidelity before and after alignment moves for one known reason.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from rlsim.cli import main
from tests.fake_openai import LESSON, FakeOpenAI, FaultConfig
from tests.ray_local import private_ray

SECRET = "sk-align-secret-never-written"


def flags(data_root, cache, split="u1"):
    return ["--dataset", "ml-100k", "--split", split, "--data-dir", str(data_root), "--cache-dir", str(cache),
            "--no-download"]


@pytest.fixture
def cache(cache_root, tmp_path):
    """The session's embeddings, and a response cache of this test's own."""
    dst = tmp_path / "cache"
    shutil.copytree(cache_root, dst, ignore=shutil.ignore_patterns("personas"), dirs_exist_ok=True)
    return dst


@pytest.fixture
def persona(ml100k, monkeypatch):
    """The test server answering as the scripted persona, and the environment pointing at it."""
    table = {(int(u), int(i)): float(r) for u, i, r in
             ml100k.ratings[["user_id", "item_id", "rating"]].itertuples(index=False)}
    srv = FakeOpenAI(FaultConfig()).start()
    p = srv.set_persona(table)
    monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    for k in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    yield srv, p
    srv.stop()


@pytest.fixture(scope="module")
def ray_local():
    with private_ray("rla") as ray:
        yield ray


def split_of(ml100k, name="u1"):
    from rlsim.data import make_split

    return make_split(ml100k, name)


def requests_per_user(demos: int, chunk: int = 5) -> int:
    return math.ceil(demos / chunk) + 3  # next-state chunks, pairs, what-ifs, reflection


def read(out: Path, name: str):
    return json.loads((out / name).read_text())


# ---------------------------------------------------------------- the loop, end to end

def test_align_writes_lessons_that_remove_the_bias(data_root, cache, tmp_path, persona, ray_local, ml100k):
    srv, p = persona
    out = tmp_path / "al"
    common = flags(data_root, cache)
    assert main(["personas", "align", *common, "--model", "fake-model", "--users", "6", "--rpm", "60000",
                 "--quiet", "--out", str(out)]) == 0
    m = read(out, "metrics.json")
    assert m["backend"] == "openai" and m["users"]["aligned"] == 6 and m["users"]["failed"] == 0
    # Biased by one point below (clipped at 1) before, exact after: the bias is gone.
    b, a = m["before"], m["after"]
    assert b["n"] == a["n"] == m["validation"]["pairs_of_aligned_users"] > 0
    assert b["mean_signed_error"] < -0.7 and b["rmse"] > 0.8
    assert a["rmse"] == 0.0 and a["exact"] == 1.0
    assert m["delta"]["rmse"] < -0.8
    # Its own demonstrations: off by one point, and pair choices compared on its biased ratings.
    assert m["align_answers"]["next_state"]["mean_signed_error"] < -0.7
    # Lessons: stored versioned, with the demonstrations they came from.
    lessons = pd.read_parquet(out / "lessons.parquet")
    assert set(lessons["text"]) == {LESSON} and lessons["user_id"].nunique() == 6
    assert (lessons["version"] == 1).all() and m["lessons_per_user"]["mean"] == 1.0
    meta = read(out, "lessons.json")
    assert meta["format"] == 1 and meta["version"] == 1 and meta["parent"] is None
    assert meta["dataset"] == "ml-100k" and meta["split"] == "u1" and len(meta["split_fingerprint"]) == 64
    assert meta["backend"] == "openai" and meta["model"] == "fake-model" and len(meta["prompts_sha256"]) == 64
    demos = pd.read_parquet(out / "demonstrations.parquet")
    assert set(demos["user_id"]) == set(lessons["user_id"])
    train = split_of(ml100k).train
    got = demos.merge(train, on=["user_id", "item_id"], suffixes=("", "_train"))
    assert len(got) == len(demos)  # every shown rating is a training rating, with its rating and timestamp
    assert (got["rating"] == got["rating_train"]).all() and (got["timestamp"] == got["timestamp_train"]).all()
    # Requests: ceil(demos / chunk) + 3 per user, through the pool; usage per aligned user is reported.
    users = pd.read_parquet(out / "align_users.parquet")
    expected = sum(requests_per_user(int(d)) for d in users["demonstrations"])
    assert m["usage"]["align"]["requests"] == expected
    assert len(srv.log) == expected + m["usage"]["before"]["requests"] + m["usage"]["after"]["requests"]
    per = m["per_aligned_user"]
    assert per["tokens"] > 0 and per["cost_usd"] > 0 and per["requests"] == expected / 6
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    # evaluate --lessons: the lessons enter every prompt, and on the held-out ratings the bias is gone.
    n = len(p.seen)
    ev = tmp_path / "ev"
    assert main(["personas", "evaluate", *common, "--model", "fake-model", "--users", "6", "--rpm", "60000",
                 "--lessons", str(out), "--quiet", "--out", str(ev)]) == 0
    rate_prompts = [t for k, _, t in p.seen[n:] if k == "rate"]
    assert rate_prompts and all("Lessons from your own past ratings: (1) " + LESSON in t for t in rate_prompts)
    ev0 = tmp_path / "ev0"
    assert main(["personas", "evaluate", *common, "--model", "fake-model", "--users", "6", "--rpm", "60000",
                 "--quiet", "--out", str(ev0)]) == 0
    with_l, without = read(ev, "metrics.json"), read(ev0, "metrics.json")
    assert with_l["job"]["lessons"]["users_with_lessons"] == 6 and with_l["job"]["lessons"]["version"] == 1
    assert without["persona"]["rmse"] > 0.8 and with_l["persona"]["rmse"] == 0.0
    # The same job folder with other lessons is another job: refused.
    assert main(["personas", "evaluate", *common, "--model", "fake-model", "--users", "6", "--quiet",
                 "--out", str(ev0), "--lessons", str(out)]) == 2


def test_demonstrations_exclude_validation_and_test_ratings(data_root, cache, tmp_path, persona, ml100k):
    """A temporal split: the test ratings are each user's latest, the validation slice a random part of the
    rest, the demonstrations the latest of what remains. No prompt of the loop shows a test or validation movie."""
    from rlsim.data.splits import holdout_validation
    from rlsim.personas.prompts import movie_label

    srv, p = persona
    out = tmp_path / "al"
    assert main(["personas", "align", *flags(data_root, cache, "temporal"), "--model", "fake-model", "--users", "8",
                 "--no-ray", "--no-cache", "--quiet", "--out", str(out)]) == 0
    split = split_of(ml100k, "temporal")
    _, val = holdout_validation(split.train, 0.2, 0)
    demos = pd.read_parquet(out / "demonstrations.parquet")
    users = set(demos["user_id"])
    assert len(users) == 8
    key = ["user_id", "item_id"]
    assert not len(demos.merge(split.test[key], on=key)), "a demonstration is a test rating"
    assert not len(demos.merge(val[key], on=key)), "a demonstration is a validation rating"
    # The validation slice is where before/after is measured, and nothing else.
    vp = pd.read_parquet(out / "validation.parquet")
    assert len(vp) and len(vp.merge(val[key], on=key)) == len(vp)
    # Test and validation movies of a user never appear in that user's alignment prompts.
    labels = {int(r["item_id"]): movie_label(r) for r in ml100k.items.to_dict("records")}
    held = pd.concat([split.test[key], val[key]])
    held = held[held["user_id"].isin(users)]
    by_user = {u: {labels[i] for i in g["item_id"]} for u, g in held.groupby("user_id")}
    loop = [(u, t) for k, u, t in p.seen if k in ("next_state", "pairs", "whatif", "reflect")]
    assert {u for u, _ in loop} == users
    for u, text in loop:
        leaked = [lab for lab in by_user.get(u, ()) if lab in text]
        assert not leaked, (u, leaked)
    # The demonstrations are the user's most recent ratings outside the validation slice, in time order.
    pool = split.train.merge(val[key], on=key, how="left", indicator=True)
    pool = pool[pool["_merge"] == "left_only"]
    for u, g in demos[demos["role"] == "demonstration"].groupby("user_id"):
        mine = pool[pool["user_id"] == u].sort_values(["timestamp", "item_id"], kind="stable")
        assert list(g.sort_values("position")["item_id"]) == list(mine["item_id"].tail(len(g)))


def test_dry_run_calls_nothing_and_estimates_the_whole_run(data_root, cache, tmp_path, persona):
    srv, _ = persona
    common = [*flags(data_root, cache), "--model", "fake-model", "--users", "5", "--rpm", "60000", "--no-ray",
              "--quiet"]
    dry = tmp_path / "dry"
    assert main(["personas", "align", *common, "--dry-run", "--out", str(dry)]) == 0
    est = read(dry, "dry_run.json")
    assert len(srv.log) == 0 and not (dry / "lessons.json").exists()
    assert est["align"]["requests"] > 0 and est["align"]["cost_usd"] > 0 and est["before"]["requests"] > 0
    assert est["total"]["requests"] == est["align"]["requests"] + est["before"]["requests"] + \
        est["after"]["requests"]
    assert est["total"]["cost_usd"] > 0 and est["price_known"] is True
    out = tmp_path / "al"
    assert main(["personas", "align", *common, "--out", str(out)]) == 0
    m = read(out, "metrics.json")
    # Every answer was usable at the first try: the estimate's requests are the run's.
    assert m["usage"]["align"]["requests"] == est["align"]["requests"] == len(srv.log) - \
        m["usage"]["before"]["requests"] - m["usage"]["after"]["requests"]
    assert est["before"]["requests"] == m["usage"]["before"]["requests"]
    # Tokens: the reflection is estimated at its largest, so the estimate is an upper bound, and close.
    real = m["usage"]["align"]["prompt_tokens"]
    assert 0.7 * est["align"]["prompt_tokens"] <= real <= 1.3 * est["align"]["prompt_tokens"]


def test_budget_stops_cleanly_and_a_rerun_finishes_without_paying_twice(data_root, cache, tmp_path, persona):
    srv, _ = persona
    common = [*flags(data_root, cache), "--model", "fake-model", "--users", "6", "--rpm", "60000", "--no-ray",
              "--quiet", "--concurrency", "1"]
    out = tmp_path / "al"
    assert main(["personas", "align", *common, "--budget-usd", "0.006", "--out", str(out)]) == 0
    m = read(out, "metrics.json")
    assert m["spent_usd"] <= 0.006 + 1e-9  # the whole run (alignment and measurement) stays under the cap
    assert m["users"]["failed"] > 0 and m["failures"]["users"] == {"budget": m["users"]["failed"]}
    assert any("run the same command again" in n for n in m["notes"])
    users = pd.read_parquet(out / "align_users.parquet")
    lessons = pd.read_parquet(out / "lessons.parquet")
    assert set(lessons["user_id"]) == set(users.loc[users["status"] == "ok", "user_id"])
    assert (users.loc[users["status"] == "failed", "reason"] == "budget").all()
    first = len(srv.log)
    # A rerun with room finishes: no answered request is sent again (journal and cache), nothing is lost.
    assert main(["personas", "align", *common, "--budget-usd", "1", "--out", str(out)]) == 0
    m2 = read(out, "metrics.json")
    assert m2["users"]["aligned"] == 6 and m2["users"]["failed"] == 0 and m2["resumed"] == 1
    assert m2["after"]["rmse"] == 0.0 and m2["before"]["rmse"] > 0.8
    assert m2["after"]["n"] == m2["validation"]["pairs_of_aligned_users"]
    fresh = tmp_path / "ref"
    srv_requests = len(srv.log)
    assert main(["personas", "align", *common, "--no-cache", "--out", str(fresh)]) == 0
    ref = read(fresh, "metrics.json")
    one_run = ref["usage"]["align"]["requests"] + ref["usage"]["before"]["requests"] + \
        ref["usage"]["after"]["requests"]
    assert srv_requests == one_run and first < one_run  # two runs with a budget stop sent what one run sends
    assert m2["usage"]["align"]["requests"] == ref["usage"]["align"]["requests"]
    # Another alignment into the same folder is refused.
    assert main(["personas", "align", *common, "--demos", "7", "--out", str(out)]) == 2


def test_a_second_round_starts_from_the_lessons_and_versions_them(data_root, cache, tmp_path, persona):
    srv, _ = persona
    common = [*flags(data_root, cache), "--model", "fake-model", "--users", "4", "--rpm", "60000", "--no-ray",
              "--quiet"]
    v1 = tmp_path / "v1"
    assert main(["personas", "align", *common, "--out", str(v1)]) == 0
    v2 = tmp_path / "v2"
    assert main(["personas", "align", *common, "--lessons", str(v1), "--out", str(v2)]) == 0
    meta = read(v2, "lessons.json")
    assert meta["version"] == 2 and meta["parent"]["version"] == 1 and meta["parent"]["source"] == str(v1)
    m = read(v2, "metrics.json")
    # Before this round the persona already had its lesson: exact before and after; it keeps the lesson.
    assert m["before"]["rmse"] == 0.0 and m["after"]["rmse"] == 0.0
    assert set(pd.read_parquet(v2 / "lessons.parquet")["text"]) == {LESSON}
    assert m["align_answers"]["next_state"]["mae"] == 0.0


# ---------------------------------------------------------------- refusals

def test_offline_refuses_in_one_line(data_root, cache, tmp_path, monkeypatch, capsys):
    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    for extra in ([], ["--backend", "offline"], ["--backend", "offline", "--dry-run"]):
        rc = main(["personas", "align", *flags(data_root, cache), *extra, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("rlsim: error:") and "\n" not in err
        assert "offline" in err and "no lessons" in err
    assert not (tmp_path / "x").exists()
    # Nor does the offline persona read lessons in rate or evaluate.
    (tmp_path / "l").mkdir()
    rc = main(["personas", "evaluate", *flags(data_root, cache), "--no-ray", "--lessons", str(tmp_path / "l"),
               "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "reads no lessons" in err
    from rlsim.config import DataConfig
    from rlsim.errors import ConfigError
    from rlsim.personas.align import AlignConfig
    from rlsim.personas.config import PersonaConfig
    from rlsim.personas.run import align_stage

    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=str(data_root), cache_dir=str(cache), download=False)
    with pytest.raises(ConfigError, match="no lessons"):
        align_stage(dcfg, PersonaConfig(backend="offline"), AlignConfig(), tmp_path / "y", use_ray=False)


def test_lessons_from_another_split_are_refused(data_root, cache, tmp_path, persona, capsys):
    srv, _ = persona
    les = tmp_path / "u2"
    assert main(["personas", "align", *flags(data_root, cache, "u2"), "--model", "fake-model", "--users", "3",
                 "--no-ray", "--quiet", "--out", str(les)]) == 0
    n = len(srv.log)
    rate = ["personas", "rate", *flags(data_root, cache), "--model", "fake-model", "--users", "3", "--no-ray",
            "--quiet", "--lessons", str(les)]
    assert main([*rate, "--out", str(tmp_path / "r1")]) == 2
    assert "split u2" in capsys.readouterr().err and len(srv.log) == n
    # The same split name with another hold-out is caught by the fingerprint.
    meta = read(les, "lessons.json")
    meta.update(split="u1", split_fingerprint="0" * 64)
    (les / "lessons.json").write_text(json.dumps(meta))
    assert main([*rate, "--out", str(tmp_path / "r2")]) == 2
    assert "another 'u1' split" in capsys.readouterr().err
    # Lessons learned from a rating this split holds out would leak it.
    from rlsim.data import load_movielens, make_split
    from rlsim.personas.stages_common import split_fingerprint

    ds = load_movielens("ml-100k", data_dir=data_root, cache_dir=cache, download=False)
    u1 = make_split(ds, "u1")
    meta.update(split_fingerprint=split_fingerprint(u1))
    (les / "lessons.json").write_text(json.dumps(meta))
    demos = pd.read_parquet(les / "demonstrations.parquet")
    t = u1.test.iloc[:1]
    demos = pd.concat([demos, demos.iloc[:1].assign(user_id=int(t["user_id"].iloc[0]),
                                                    item_id=int(t["item_id"].iloc[0]))])
    demos.to_parquet(les / "demonstrations.parquet", index=False)
    assert main([*rate, "--out", str(tmp_path / "r3")]) == 2
    assert "holds out" in capsys.readouterr().err and len(srv.log) == n


def test_bad_alignment_settings_are_one_line_errors(data_root, cache, tmp_path, persona, capsys):
    srv, _ = persona
    for bad, what in ((["--chunk", "0"], "chunk"), (["--validation-frac", "1.5"], "validation-frac"),
                      (["--max-lessons", "0"], "max-lessons")):
        rc = main(["personas", "align", *flags(data_root, cache), "--model", "fake-model", "--no-ray", *bad,
                   "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and what in err
    assert len(srv.log) == 0


# ---------------------------------------------------------------- pieces

def test_unusable_answers_are_asked_again_and_counted():
    """A next-state answer missing a movie is asked again under a new answer index (not replayed)."""
    import asyncio

    from rlsim.data.schema import RatingScale
    from rlsim.personas.align.user import ask_until_usable, rating_parser
    from rlsim.personas.usage import empty_usage

    answers = iter(['{"1": 4}', '{"1": 4, "2": 3}'])
    seen = []

    class Engine:
        async def complete(self, messages, rf, usage=None, answer_index=0):
            seen.append(answer_index)
            return next(answers), ""

    parse = rating_parser([1, 2], RatingScale(1, 5, 1))
    got, why, kind, idx = asyncio.run(ask_until_usable(Engine(), [], None, parse, empty_usage(), 0, 3))
    assert got == {1: 4.0, 2: 3.0} and why == "" and seen == [0, 1] and idx == 1


def test_lessons_are_cleaned_and_capped():
    from rlsim.personas.align import clean_lessons
    from rlsim.personas.prompts import lessons_text, profile_with_lessons

    raw = ["  I rate\n dramas lower. ", "I rate dramas lower.", 3, "", "x" * 500, "Fourth."]
    got = clean_lessons(raw, 3)
    assert got[0] == "I rate dramas lower." and len(got) == 3 and len(got[1]) <= 204 and got[2] == "Fourth."
    assert clean_lessons(raw, 1) == ["I rate dramas lower."] and clean_lessons("not a list", 3) == []
    assert lessons_text([]) == "" and profile_with_lessons("P.", []) == "P."
    line = profile_with_lessons("P.", ["A.", "B."])
    assert line == "P. Lessons from your own past ratings: (1) A. (2) B." and "\n" not in line


def test_scripted_persona_is_biased_until_it_has_its_lesson():
    from tests.fake_openai import ScriptedPersona

    p = ScriptedPersona({(1, 10): 4.0, (1, 11): 1.0})
    assert json.loads(p.answer("Movies to rate", "", 1, [10, 11])) == {"10": 3, "11": 1}
    assert json.loads(p.answer("Movies to rate", LESSON, 1, [10, 11])) == {"10": 4, "11": 1}
    refl = 'Write at most 3 ... {"lessons": ...}\n- A: you guessed 3, you really rated 4\n- B: you guessed 2, ' \
           'you really rated 3'
    assert json.loads(p.answer(refl, refl, 1, [])) == {"lessons": [LESSON]}
    fine = 'Write at most 3 ... {"lessons": ...}\n- A: you guessed 4, you really rated 4'
    assert json.loads(p.answer(fine, fine, 1, [])) == {"lessons": []}


def test_tinytroupe_aligns_through_its_agents(data_root, cache, tmp_path, persona):
    """The tinytroupe backend: every alignment request is a TinyPerson's answer (skips without TinyTroupe)."""
    import importlib.util

    if importlib.util.find_spec("tinytroupe") is None:
        pytest.skip("TinyTroupe is not installed (docs/personas.md: The TinyTroupe backend)")
    srv, p = persona
    out = tmp_path / "tt"
    assert main(["personas", "align", *flags(data_root, cache), "--backend", "tinytroupe", "--model", "fake-model",
                 "--users", "2", "--demos", "10", "--rpm", "60000", "--no-ray", "--quiet", "--out", str(out)]) == 0
    m = read(out, "metrics.json")
    assert m["backend"] == "tinytroupe" and m["users"]["aligned"] == 2
    assert m["before"]["rmse"] > 0.8 and m["after"]["rmse"] == 0.0
    assert {r.schema_name for r in srv.log} <= {"CognitiveActionsModel", "CognitiveActionModel"}
    assert m["per_aligned_user"]["prompt_tokens"] > 10 * m["per_aligned_user"]["requests"]
