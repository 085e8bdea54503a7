"""The sim-to-real study: statistics by hand, and the whole study on the fixture."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rlsim.errors import ConfigError
from rlsim.study import StudyConfig
from rlsim.study_steps import mean_ci


def test_mean_ci_by_hand():
    m = mean_ci([1.0, 2.0, 3.0])
    assert m["mean"] == 2.0 and m["ci95"][0] < 2.0 < m["ci95"][1] and m["n"] == 3
    assert mean_ci([0.5])["ci95"] is None


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown source"):
        StudyConfig(sources=["bias", "oracle"]).validate()
    with pytest.raises(ConfigError, match="at least two"):
        StudyConfig(sources=["bias"]).validate()
    with pytest.raises(ConfigError, match="llm_persona_actor"):
        StudyConfig(sources=["bias", "llm_persona"]).validate()
    with pytest.raises(ConfigError, match="study.bpr_grid"):
        StudyConfig(bpr_grid=[{"factors": 8, "lr_decay": 0.9}]).validate()
    with pytest.raises(ConfigError, match="bootstrap must be >= 1"):
        StudyConfig(bootstrap=0).validate()


def test_study_end_to_end_on_fixture(tmp_path, data_root, cache_root, tiny_reward_checkpoint, monkeypatch):
    import yaml

    import rlsim.env
    from rlsim.cli import main

    builds = []
    build = rlsim.env.build_env_data
    monkeypatch.setattr(rlsim.env, "build_env_data", lambda *a, **k: builds.append(1) or build(*a, **k))

    cfg = {"data": {"dataset": "ml-100k", "split": "u1", "data_dir": str(data_root), "cache_dir": str(cache_root),
                    "download": False},
           "candidates": {"k": 10},
           "policy": {"train_batch_size": 250, "minibatch_size": 125, "num_epochs": 1, "hidden": 16,
                      "users_per_episode": 8, "num_envs_per_env_runner": 8},
           "study": {"sources": ["bias", "mf", "reward_model", "hybrid"], "seeds": 2, "env_steps": 500,
                     "bootstrap": 200, "reward_checkpoint": str(tiny_reward_checkpoint),
                     "bpr_grid": [{"factors": 8, "reg": 0.01, "epochs": 3}, {"factors": 8, "reg": 0.1, "epochs": 3}],
                     "hybrid": {"threshold": 0.9, "distill_every": 0}}}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "study"
    assert main(["study", "--config", str(p), "--out", str(out), "--quiet", "--num-cpus", "1"]) == 0
    r = json.loads((out / "study.json").read_text())
    sources = ["bias", "mf", "reward_model", "hybrid"]
    assert len(builds) == 1  # the env's tables are built once for the 8 policies (same split and candidates)
    assert r["source_names"] == sources and r["seeds"] == 2
    # Where the time went: every source's fidelity, and each policy's training and judging, per seed.
    t = r["timing"]
    assert set(t["fidelity"]) == set(t["policy_training"]) == set(t["policy_other"]) == set(sources)
    assert all(len(v) == 2 and min(v) > 0 for v in t["policy_training"].values())
    assert [x["wall_seconds"] for x in r["runs"]["mf"]] == pytest.approx(t["policy_training"]["mf"], abs=0.06)
    assert 0 < t["reward_and_candidates"] + t["references"] + t["aggregate"] + sum(t["fidelity"].values()) \
        + sum(map(sum, t["policy_training"].values())) + sum(map(sum, t["policy_other"].values())) <= r["seconds"] + 1
    # The matrix: every policy judged by every source; the diagonal is each policy's own simulator.
    assert set(r["matrix"]) == set(sources) and all(set(row) == set(sources) for row in r["matrix"].values())
    # Held-out users only among users with held-out behaviour; every rate names its denominator.
    held, z = r["held_out"], np.load(out / "outcomes.npz")
    test_users = set(pd.read_csv(data_root / "ml-100k" / "u1.test", sep="\t", header=None)[0])
    assert set(z["held_out_user_ids"].ravel()) <= test_users and z["held_out_user_ids"].shape == (2, held["users_per_seed"])
    assert r["held_out_users_with_behaviour"] == r["held_out_users"] == held["users_per_seed"] > 0
    train_users = set(pd.read_csv(data_root / "ml-100k" / "u1.base", sep="\t", header=None)[0])
    assert held["env_users"] == len(train_users) and held["eligible_users"] == len(train_users & test_users)
    refs = {"popularity", "random", "real_oracle", "mf_top1", "bpr_top1", "reward_model_greedy"}
    assert set(r["references"]) == refs and set(r["sources"]) == set(sources)
    for n in sources:
        b = r["sources"][n]
        assert len(r["runs"][n]) == 2 and b["hit_rate"]["n_seeds"] == 2
        assert b["hit_rate"]["n_users"] == b["watch_rate"]["n_users"] == held["users_per_seed"]
        assert 500 <= r["env_steps"][n] < 1000  # equal env steps for every policy
        assert 0 <= b["hit_rate"]["mean"] <= b["watch_rate"]["mean"] <= 1
        v = b["vs_popularity"]  # every source, Holm-corrected, no best-of
        assert v["ci95"][0] <= v["mean"] <= v["ci95"][1] and v["p"] <= v["p_holm"] <= 1 and v["n_users"] > 0
        # The real oracle's first pick is liked whenever any candidate is: no policy beats it.
        assert z[f"hit/{n}"].shape == z["hit/real_oracle"].shape and (z[f"hit/{n}"] <= z["hit/real_oracle"]).all()
        assert 0 < b["coverage"]["mean"] <= 1
    assert r["references"]["real_oracle"]["ndcg"]["mean"] == pytest.approx(1.0)
    assert r["reference_settings"]["bpr"]["chosen"]["factors"] == 8
    assert set(r["fidelity_vs_real_spearman"]) == {"nll", "rmse", "tv_sampled", "like_acc_1to9"}
    # Every source answered every test pair and every training reward its policies asked for.
    assert all(r["fidelity"][n]["coverage"] == 1.0 for n in sources)
    # Choice fidelity of every source that chooses, beside popularity's in the same trials.
    ref = r["choice_reference"]["popularity"]
    assert 0.5 < ref["auc"] <= 1 and ref["trials_1to9"] > 0
    for n in sources:
        c = r["fidelity"][n]["choice"]
        if n == "reward_model":  # the tiny checkpoint has no choice head: it only rates
            assert c is None
            continue
        assert {"auc", "acc_1to1", "acc_1to3", "acc_1to9", "f1_1to9"} <= set(c) and c["trials_1to9"] == ref["trials_1to9"]
    assert "Choice fidelity" in (out / "report.html").read_text()
    assert all(r["reward_accounting"][n]["answered"] == r["reward_accounting"][n]["asked"] >= 1000 for n in sources)
    assert r["fidelity_vs_real_spearman"]["nll"]["excluded_low_coverage"] == {}
    assert r["fidelity_vs_real_spearman"]["nll"]["spearman"] is not None
    assert "popularity-first" in r["answer"]
    assert r["fidelity_vs_real_spearman"]["nll"]["replicates"] == 200
    assert r["hybrid_vs_ends"]["better"] is None and "offline_persona" in r["hybrid_vs_ends"]["note"]
    assert "popularity-first" in r["answer"] and all(n in r["answer"] for n in sources)
    short = [n for n in sources if r["sources"][n]["vs_popularity"]["verdict"] != "better"]
    if short:  # the question each such policy gets wrong: its gap split into choice and rating
        assert set(r["shortfall"]["sources"]) == set(short) and r["shortfall"]["question"] in r["answer"] or \
            "the simulated users get wrong" in r["answer"]
    assert (out / "matrix.png").stat().st_size > 5000
    html = (out / "report.html").read_text()
    assert "The answer" in html and "matrix.png" in html and "Real held-out behaviour" in html
    assert "minus popularity-first" in html and "implicit BPR top-1" in html


def test_hybrid_curve_counts_persona_calls_against_persona_only(tmp_path, data_root, cache_root,
                                                                 tiny_reward_checkpoint):
    import tempfile

    from rlsim.commands.ray_session import ray_session
    from rlsim.report_study import write_study_report
    from rlsim.run_config import resolve
    from rlsim.study_hybrid import hybrid_curve

    sections = {"data": {"dataset": "ml-100k", "split": "u1", "data_dir": str(data_root), "cache_dir": str(cache_root),
                         "download": False},
                "candidates": {"k": 10}, "policy": {"train_batch_size": 250, "minibatch_size": 125, "num_epochs": 1,
                                                    "hidden": 16, "users_per_episode": 8,
                                                    "num_envs_per_env_runner": 8},
                "study": {"hybrid_thresholds": [0, 0.9, 1.01], "seeds": 1, "env_steps": 250,
                          "hybrid": {"distill_every": 0}}}
    with ray_session(num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rlsh", dir="/tmp")):
        r = hybrid_curve(resolve(sections, {}, {}), str(tiny_reward_checkpoint), tmp_path / "h", progress=False)
    by = {c["threshold"]: c for c in r["curve"]}
    assert by[0.0]["persona_calls"] > 0 and by[0.0]["calls_saved"] == 0.0
    assert by[1.01]["persona_calls"] == 0 and by[1.01]["calls_saved"] == 1.0
    assert 0 <= by[0.9]["calls_saved"] <= 1
    assert all(0 <= c["real_hit_rate"] <= 1 for c in r["curve"])
    # 1.01 never asks the persona: it is the reward-model-only end, never the goal's answer.
    assert r["ends"] == {"persona_only": 0.0, "reward_model_only": 1.01} and 1.01 not in r["meets_goal_at"]
    v = by[0.9]["beats_both_ends"]
    assert set(v["vs"]) == {0.0, 1.01} and isinstance(v["better"], bool)
    assert by[0.0]["beats_both_ends"] is None and by[1.01]["beats_both_ends"] is None
    assert r["better_than_both_ends_at"] in ([], [0.9])
    html = write_study_report({"dataset": "ml-100k", "split": "u1", "answer": "-", "sources": {}}, tmp_path,
                              hybrid=r).read_text()
    assert "Hybrid reward: persona calls saved" in html and (tmp_path / "hybrid.png").stat().st_size > 5000


def test_the_correlation_leaves_out_sources_with_low_fidelity_coverage():
    from rlsim.study import fidelity_for_correlation

    def f(nll, coverage):
        return {"nll": nll, "rmse": nll, "tv_sampled": nll, "like_acc_1to9": -nll, "coverage": coverage}

    # llm_persona answered half the test pairs: its NLL (the best) is over the pairs it happened to answer.
    fid = {"a": f(1.0, 1.0), "b": f(2.0, 1.0), "c": f(3.0, 1.0), "llm_persona": f(0.1, 0.5)}
    kept, low = fidelity_for_correlation(fid, 1.0)
    assert sorted(kept) == ["a", "b", "c"] and low == {"llm_persona": 0.5}
    kept, low = fidelity_for_correlation(fid, 0.5)  # explicitly allowed
    assert sorted(kept) == ["a", "b", "c", "llm_persona"] and low == {}
    with pytest.raises(ConfigError, match="min_fidelity_coverage"):
        StudyConfig(min_fidelity_coverage=2.0).validate()


def test_each_source_reports_its_training_rewards():
    from rlsim.study import source_accounting

    runs = [{"reward_accounting": {"source": "llm_persona", "asked": 10, "answered": 9, "failed": 1,
                                   "failed_by_reason": {"budget": 1}, "failed_share": 0.1}},
            {"reward_accounting": {"source": "llm_persona", "asked": 10, "answered": 8, "failed": 2,
                                   "failed_by_reason": {"budget": 1, "http_500": 1}, "failed_share": 0.2}}]
    acc = source_accounting(runs)
    assert acc == {"asked": 20, "answered": 17, "failed": 3, "failed_by_reason": {"budget": 2, "http_500": 1},
                   "failed_share": 0.15}


def test_the_study_report_says_coverage_and_failures(tmp_path):
    from rlsim.report_study import write_study_report

    result = {"dataset": "ml-100k", "split": "u1", "answer": "-", "source_names": ["mf", "llm_persona"], "sources": {},
              "fidelity": {"mf": {"method": "ordinal noise", "coverage": 1.0, "nll": 1.3},
                           "llm_persona": {"method": "logprobs", "coverage": 0.5, "nll": 1.1}},
              "fidelity_vs_real_spearman": {"nll": {"spearman": None, "sources": ["mf"],
                                                    "excluded_low_coverage": {"llm_persona": 0.5}}},
              "reward_accounting": {"llm_persona": {"asked": 20, "answered": 17, "failed": 3,
                                                    "failed_by_reason": {"budget": 2, "http_500": 1}}}}
    html = write_study_report(result, tmp_path).read_text()
    assert "llm_persona (0.500)" in html and "budget: 2, http_500: 1" in html and "<th>coverage</th>" in html


def test_the_study_trains_its_reward_model_and_candidates_with_the_pipelines_stages(tmp_path, monkeypatch):
    """rlsim.study runs the pipeline's own reward and candidates stages (rlsim.pipeline.STAGES) into
    OUT/reward and OUT/candidates: a kept checkpoint is not retrained; candidates are rewritten."""
    from rlsim import pipeline
    from rlsim.run_config import resolve
    from rlsim.study_steps import candidates_stage, reward_stage

    calls = []

    def fake_reward(ctx, d):
        calls.append(("reward", ctx.run.reward.epochs, ctx.load()))
        (d / "checkpoint").mkdir(parents=True)
        (d / "checkpoint" / "model.pt").write_bytes(b"x")
        return {"model": {}}

    def fake_candidates(ctx, d):
        calls.append(("candidates", ctx.run.candidates.k, ctx.load()))
        pd.DataFrame({"user_id": [1], "item_id": [2]}).to_parquet(d / "candidates.parquet")
        return {"candidates": {"blend": {"recall": 0.5}}}

    monkeypatch.setitem(pipeline.STAGES, "reward", fake_reward)
    monkeypatch.setitem(pipeline.STAGES, "candidates", fake_candidates)
    run = resolve({"reward": {"epochs": 3}, "candidates": {"k": 7}}, {}, {})
    loaded = ("ds", "split")
    assert reward_stage(run, tmp_path, loaded, progress=False) == str(tmp_path / "reward" / "checkpoint")
    assert reward_stage(run, tmp_path, loaded, progress=False) == str(tmp_path / "reward" / "checkpoint")
    metrics, cands = candidates_stage(run, tmp_path, loaded)
    candidates_stage(run, tmp_path, loaded)
    assert calls == [("reward", 3, loaded), ("candidates", 7, loaded), ("candidates", 7, loaded)]
    assert metrics["candidates"]["blend"]["recall"] == 0.5 and "stage_seconds" in metrics and len(cands) == 1
