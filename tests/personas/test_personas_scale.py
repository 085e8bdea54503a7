"""Persona rating jobs at scale: what the driver holds (open shards, units in flight), units built per
shard, ratings.parquet streamed from the shard files, and a kill -9 with many shards then resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlsim.io import write_parquet
from rlsim.personas import shards
from rlsim.personas.backends import BackendSpec
from rlsim.personas.config import PersonaConfig
from rlsim.personas.grounding import PromptBuilder, UnitSource, WorkUnit, pairs_source, unit_id_of
from rlsim.personas.job import run_rating_job
from rlsim.personas.journal import ROW_COLUMNS, Journal, is_final
from rlsim.personas.plan import plan_shards
from rlsim.personas.workers import dispatch_window
from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating

REPO = Path(__file__).resolve().parents[2]
OFFLINE = BackendSpec("offline", "offline")


class Formula:
    """A stand-in for the fitted offline persona: the fake server's rating of (user, item)."""

    def predict_raw(self, users, items):
        return (1 + (np.asarray(users) * 7 + np.asarray(items)) % 5).astype(float)


def items_of(user: int, n: int = 6) -> list[int]:
    return [1 + (user * 37 + j * 101) % 2000 for j in range(n)]


def offline_unit(user: int, n: int = 6) -> WorkUnit:
    return WorkUnit(int(user), items_of(int(user), n), "", [], {}, (1.0, 5.0, 1.0))


def offline_source(n_users: int, n: int = 6) -> UnitSource:
    """Units built on demand; their ids (the plan) without building them."""
    return UnitSource(np.arange(1, n_users + 1), lambda users: [offline_unit(u, n) for u in users],
                      lambda users: [(unit_id_of(u, items_of(int(u), n)), n) for u in users])


def llm_units(n_users: int, n_items: int, batch: int, dup: bool = False) -> list[WorkUnit]:
    out = []
    for u in range(1, n_users + 1):
        ids = [100 + 3 * j + u for j in range(n_items)]
        batches = [ids[s:s + batch] for s in range(0, n_items, batch)]
        if dup:
            batches.append(ids[:1] + [9999])  # the same pair in two units of one user
        for b in batches:
            items = [{"item_id": i, "title": f"Film {i}", "year": 1990, "genres": "Drama"} for i in b]
            out.append(WorkUnit(u, b, f"A viewer number {u}.", items, {}, (1.0, 5.0, 1.0)))
    return out


def llm_cfg(**kw) -> PersonaConfig:
    base = dict(backend="openai", model="fake-model", max_retries=0, timeout_s=5.0, backoff_base_s=0.01,
                backoff_max_s=0.05, rpm=1e6, tpm=1e9, max_concurrency=2, n_workers=1, shard_users=2, cache=False)
    base.update(kw)
    return PersonaConfig(**base)


def whole_run_frame(job: Path, units: list[WorkUnit]) -> tuple[pd.DataFrame, dict]:
    """What finish_job built before it streamed: one frame of every row in the journal, and its counts."""
    state, _, _ = Journal(job / "journal.jsonl").load()
    rows = [state.get(u.unit_id, {}).get(i) for u in units for i in u.item_ids]
    df = pd.DataFrame([r for r in rows if r is not None], columns=ROW_COLUMNS)
    df["rating"] = df["rating"].astype(float)
    df["raw"] = df["raw"].astype(float)
    df = df.sort_values(["user_id", "item_id"], kind="stable").reset_index(drop=True)
    failed = df["status"] != "ok"
    counts = {"pairs": len(df), "planned_pairs": len(rows), "rated": int((~failed).sum()), "failed": int(failed.sum()),
              "failure_reasons": {k: int(v) for k, v in df.loc[failed, "reason"].value_counts().items()},
              "retryable_failed": int(sum(not is_final(s, r) for s, r in zip(df["status"], df["reason"]))),
              "duplicates": int(df.duplicated(["user_id", "item_id"]).sum())}
    p = job / "whole.parquet"
    write_parquet(df, p)
    return pd.read_parquet(p), counts


# ---------------------------------------------------------------- what the driver holds

def test_the_driver_holds_the_rows_of_a_bounded_number_of_shards(tmp_path):
    cfg = PersonaConfig(backend="offline", shard_users=2, n_workers=1, max_concurrency=2)
    probe: dict = {}
    s = run_rating_job(offline_source(200), tmp_path / "job", OFFLINE, cfg, None, use_ray=False, progress=False,
                       offline_model=Formula(), probe=probe)
    assert s["rated"] == 1200 and s["shards"] == s["planned_shards"] == 100 and s["duplicates"] == 0
    window = dispatch_window(cfg)  # 4 units
    assert probe["max_in_flight"] <= window
    # A shard is open while one of its units is in flight (or it is being sent): window + 1 at most,
    # not the 100 shards (1,200 rows) of the run.
    assert probe["max_open_shards"] <= window + 1
    assert probe["max_rows_held"] <= (window + 1) * 2 * 6
    assert probe["shards_written"] == 100
    m = json.loads((tmp_path / "job" / "manifest.json").read_text())
    # The plan is a digest per shard (the unit ids would make the manifest as large as the run).
    assert all(isinstance(v, str) and v.startswith("2:") for v in m["plan"].values())
    df = pd.read_parquet(tmp_path / "job" / "ratings.parquet")
    assert len(df) == 1200 and (df["rating"] == Formula().predict_raw(df["user_id"], df["item_id"])).all()


def test_units_are_built_a_shard_at_a_time_when_its_turn_comes(tmp_path, monkeypatch):
    added = {"n": 0}
    seen: list = []
    sizes: list = []
    real_add = shards.ShardWriter.add

    def add(self, unit, res):
        real_add(self, unit, res)
        added["n"] += 1

    monkeypatch.setattr(shards.ShardWriter, "add", add)
    src = offline_source(60)
    real_build = src.build

    def build(users):
        seen.append(added["n"])  # results in when this shard's units were built
        sizes.append(len(users))
        return real_build(users)
    src.build = build
    cfg = PersonaConfig(backend="offline", shard_users=5, n_workers=1, max_concurrency=1)
    s = run_rating_job(src, tmp_path / "job", OFFLINE, cfg, None, use_ray=False, progress=False,
                       offline_model=Formula())
    assert s["rated"] == 360
    # 12 shards, each built once, when the results before it were in (not all up front).
    assert sizes == [5] * 12
    assert seen[0] == 0 and seen[-1] >= 60 - 5 - dispatch_window(cfg)
    assert seen == sorted(seen) and len(set(seen)) > 6
    # A list of the same units gives the same job and the same file.
    s2 = run_rating_job([offline_unit(u) for u in range(1, 61)], tmp_path / "list", OFFLINE, cfg, None,
                        use_ray=False, progress=False, offline_model=Formula())
    assert json.loads((tmp_path / "job" / "manifest.json").read_text())["plan"] == \
        json.loads((tmp_path / "list" / "manifest.json").read_text())["plan"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "job" / "ratings.parquet"),
                                  pd.read_parquet(tmp_path / "list" / "ratings.parquet"))
    assert {k: s[k] for k in ("pairs", "planned_pairs", "rated")} == {k: s2[k] for k in ("pairs", "planned_pairs",
                                                                                            "rated")}


def test_pairs_source_gives_the_units_of_the_prompt_builder():
    rng = np.random.default_rng(0)
    items = pd.DataFrame({"item_id": np.arange(1, 41), "title": [f"Film {i}" for i in range(1, 41)],
                          "year": 1990, "genres": "Drama"})
    train = pd.DataFrame({"user_id": rng.integers(1, 9, 200), "item_id": rng.integers(1, 41, 200),
                          "rating": rng.integers(1, 6, 200).astype(float)})
    pairs = pd.DataFrame({"user_id": rng.integers(1, 9, 120), "item_id": rng.integers(1, 41, 120)})
    from rlsim.data.schema import RatingScale

    b = PromptBuilder(train, items, RatingScale(1.0, 5.0, 1.0), {u: f"viewer {u}" for u in range(1, 9)}, None, 0, 4)
    want = b.units(pairs)
    src = b.source(pairs)
    assert src.users.tolist() == sorted(pairs["user_id"].unique().tolist())
    got = [u for a in range(0, len(src.users), 3) for u in src.build(src.users[a:a + 3])]
    assert [(u.unit_id, u.item_ids, u.items, u.profile_text) for u in got] == \
        [(u.unit_id, u.item_ids, u.items, u.profile_text) for u in want]
    assert src.unit_ids(src.users) == [(u.unit_id, len(u.item_ids)) for u in want]
    assert all(unit_id_of(u.user_id, u.item_ids) == u.unit_id for u in want)
    assert src.build(np.array([999])) == [] and src.unit_ids(np.array([999])) == []
    assert len(list(pairs_source(pairs, b.units, 4))) == len(want)


@pytest.mark.slow
def test_the_ray_loop_keeps_a_bounded_window_of_units_in_flight(tmp_path, monkeypatch):
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _temp_dir=tempfile.mkdtemp(prefix="rls", dir="/tmp"))
    real_todo, real_add = shards.ShardWriter.todo, shards.ShardWriter.add
    seen = {"taken": 0, "added": 0, "most": 0}

    def todo(self, skipped=None):
        for x in real_todo(self, skipped):
            seen["taken"] += 1
            seen["most"] = max(seen["most"], seen["taken"] - seen["added"])
            yield x

    def add(self, unit, res):
        seen["added"] += 1
        real_add(self, unit, res)

    monkeypatch.setattr(shards.ShardWriter, "todo", todo)
    monkeypatch.setattr(shards.ShardWriter, "add", add)
    try:
        with FakeOpenAI(FaultConfig(latency_s=0.02)) as srv:
            spec = BackendSpec("openai", "fake-model", srv.base_url, api_key="k")
            cfg = llm_cfg(n_workers=2, max_concurrency=2, shard_users=3)
            units = llm_units(40, 4, 1)  # 160 requests
            probe: dict = {}
            s = run_rating_job(units, tmp_path / "job", spec, cfg, None, use_ray=True, progress=False, probe=probe)
        assert s["rated"] == 160 and s["duplicates"] == 0 and len(srv.log) == 160
        window = dispatch_window(cfg)  # 8
        assert seen["taken"] == 160 and seen["most"] <= window and probe["max_in_flight"] <= window
        assert probe["max_open_shards"] <= window + 1
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- ratings.parquet and the summary by streaming

def test_streamed_ratings_and_summary_equal_the_whole_run_frame(tmp_path):
    units = llm_units(9, 7, 3, dup=True)
    with FakeOpenAI(FaultConfig(p_500=0.2, p_missing=0.15, p_out_of_scale=0.1, seed=3)) as srv:
        spec = BackendSpec("openai", "fake-model", srv.base_url, api_key="k")
        s = run_rating_job(units, tmp_path / "job", spec, llm_cfg(), None, use_ray=False, progress=False)
        new = pd.read_parquet(tmp_path / "job" / "ratings.parquet")
        old, counts = whole_run_frame(tmp_path / "job", units)
        assert 0 < s["failed"] < s["pairs"] and s["duplicates"] == 9  # faults and repeated pairs are in
        pd.testing.assert_frame_equal(new, old)
        assert {k: s[k] for k in counts} == counts
        # A resume retries the transient failures; the streamed file still equals the frame of everything.
        srv.set_faults(p_500=0.0, p_missing=0.0, p_out_of_scale=0.0)
        s2 = run_rating_job(units, tmp_path / "job", spec, llm_cfg(), None, use_ray=False, progress=False)
        old2, counts2 = whole_run_frame(tmp_path / "job", units)
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "job" / "ratings.parquet"), old2)
        assert {k: s2[k] for k in counts2} == counts2 and s2["failed"] == 0 and s2["retried"] == s["failed"]


def test_an_empty_job_writes_an_empty_typed_file(tmp_path):
    s = run_rating_job([], tmp_path / "job", OFFLINE, PersonaConfig(), None, use_ray=False, progress=False,
                       offline_model=Formula())
    df = pd.read_parquet(tmp_path / "job" / "ratings.parquet")
    assert s["pairs"] == s["planned_pairs"] == 0 and list(df.columns) == ROW_COLUMNS and len(df) == 0


# ---------------------------------------------------------------- kill -9 and resume with many shards

KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from rlsim.personas import shards
from rlsim.personas.config import PersonaConfig
from rlsim.personas.job import run_rating_job
from tests.personas.test_personas_scale import OFFLINE, Formula, offline_source

shards.MANIFEST_EVERY_S = float(sys.argv[3])
real_add = shards.ShardWriter.add
n = {"k": 0}

def add(self, unit, res):
    real_add(self, unit, res)
    n["k"] += 1
    if n["k"] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)

shards.ShardWriter.add = add
cfg = PersonaConfig(backend="offline", shard_users=4, n_workers=1, max_concurrency=3)
run_rating_job(offline_source(400), Path(sys.argv[1]), OFFLINE, cfg, None, use_ray=False, progress=False,
               offline_model=Formula())
"""


def _killed_run(job: Path, after: int, manifest_every_s: float) -> None:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(job), str(after),
                        str(manifest_every_s)], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-3000:]


@pytest.mark.parametrize("manifest_every_s", [0.0, 1.0])
def test_kill_9_with_many_shards_then_resume_replays_only_what_it_needs(tmp_path, manifest_every_s):
    job = tmp_path / "job"
    _killed_run(job, 230, manifest_every_s)  # 230 of 400 users (one unit each), 100 shards of 4
    m = json.loads((job / "manifest.json").read_text())
    recorded = set(m["shards"])
    journal_lines = sum(1 for _ in Journal(job / "journal.jsonl").entries())
    assert journal_lines == 230  # every result before the kill is in the journal
    cfg = PersonaConfig(backend="offline", shard_users=4, n_workers=1, max_concurrency=3)
    probe: dict = {}
    s = run_rating_job(offline_source(400), job, OFFLINE, cfg, None, use_ray=False, progress=False,
                       offline_model=Formula(), probe=probe)
    assert s["resumed"] == 1 and s["pairs"] == s["planned_pairs"] == 2400 and s["rated"] == 2400
    assert s["duplicates"] == 0 and s["missing_pairs"] == 0 and s["shards"] == 100
    # Shards recorded as done are not replayed: their rows stay in their files.
    assert probe["final_shards"] == len(recorded)
    assert probe["replayed_rows"] == (230 - 4 * len(recorded)) * 6
    if manifest_every_s == 0.0:
        assert len(recorded) >= 230 // 4 - dispatch_window(cfg) - 1
        assert probe["replayed_rows"] <= (dispatch_window(cfg) + 1) * 4 * 6  # the shards in flight at the kill
    assert sum(1 for _ in Journal(job / "journal.jsonl").entries()) == 400  # nothing was asked twice
    df = pd.read_parquet(job / "ratings.parquet")
    assert not df.duplicated(["user_id", "item_id"]).any() and len(df) == 2400
    assert (df["rating"] == Formula().predict_raw(df["user_id"], df["item_id"])).all()
    # The same file as a run that was never killed.
    run_rating_job(offline_source(400), tmp_path / "whole", OFFLINE, cfg, None, use_ray=False, progress=False,
                   offline_model=Formula())
    pd.testing.assert_frame_equal(df, pd.read_parquet(tmp_path / "whole" / "ratings.parquet"))


def test_a_job_folder_from_before_the_digests_resumes(tmp_path):
    """Manifests that list every unit id (and shards without a journal count) still resume."""
    units = llm_units(6, 4, 2)
    with FakeOpenAI(FaultConfig()) as srv:
        spec = BackendSpec("openai", "fake-model", srv.base_url, api_key="k")
        s1 = run_rating_job(units, tmp_path / "job", spec, llm_cfg(), None, use_ray=False, progress=False)
        p = tmp_path / "job" / "manifest.json"
        m = json.loads(p.read_text())
        m["plan"] = {s: sorted({u.unit_id for u in us}) for s, us in plan_shards(units, 2).items()}
        for e in m["shards"].values():
            del e["journal_lines"]
        p.write_text(json.dumps(m))
        n = len(srv.log)
        s2 = run_rating_job(units, tmp_path / "job", spec, llm_cfg(), None, use_ray=False, progress=False)
        assert len(srv.log) == n and s2["resumed"] == 1 and s2["rated"] == s1["rated"] == 24
        m2 = json.loads(p.read_text())
        assert all(isinstance(v, str) for v in m2["plan"].values())
        assert all("journal_lines" in e for e in m2["shards"].values())
        df = pd.read_parquet(tmp_path / "job" / "ratings.parquet")
        assert (df["rating"] == [expected_rating(u, i) for u, i in zip(df["user_id"], df["item_id"])]).all()
