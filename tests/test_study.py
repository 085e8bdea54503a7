"""The sim-to-real study: statistics by hand, and the whole study on the fixture."""

from __future__ import annotations

import json

import pytest

from rlsim.errors import ConfigError
from rlsim.study import StudyConfig, mean_ci, spearman_with_ci


def test_mean_ci_and_spearman_by_hand():
    m = mean_ci([1.0, 2.0, 3.0])
    assert m["mean"] == 2.0 and m["ci95"][0] < 2.0 < m["ci95"][1] and m["n"] == 3
    assert mean_ci([0.5])["ci95"] is None
    fid = {"a": 3.0, "b": 2.0, "c": 1.0}
    per_seed = {"a": [0.30, 0.31], "b": [0.20, 0.21], "c": [0.10, 0.11]}
    r = spearman_with_ci(fid, per_seed, n_boot=200)
    assert r["spearman"] == pytest.approx(1.0) and r["ci95"] == [1.0, 1.0]
    r = spearman_with_ci({"a": 1.0, "b": 2.0, "c": 3.0}, per_seed, n_boot=200)
    assert r["spearman"] == pytest.approx(-1.0)
    assert spearman_with_ci({"a": 1, "b": 2}, {"a": [1], "b": [2]}, 10)["spearman"] is None


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown source"):
        StudyConfig(sources=["bias", "oracle"]).validate()
    with pytest.raises(ConfigError, match="at least two"):
        StudyConfig(sources=["bias"]).validate()
    with pytest.raises(ConfigError, match="llm_persona_actor"):
        StudyConfig(sources=["bias", "llm_persona"]).validate()


def test_study_end_to_end_on_fixture(tmp_path, data_root, cache_root, tiny_reward_checkpoint):
    import yaml

    from rlsim.cli import main

    cfg = {"data": {"dataset": "ml-100k", "split": "u1", "data_dir": str(data_root), "cache_dir": str(cache_root),
                    "download": False},
           "candidates": {"k": 10},
           "policy": {"train_batch_size": 250, "minibatch_size": 125, "num_epochs": 1, "hidden": 16,
                      "users_per_episode": 8, "num_envs_per_env_runner": 8},
           "study": {"sources": ["bias", "mf", "reward_model", "hybrid"], "seeds": 2, "env_steps": 500,
                     "bootstrap": 200, "reward_checkpoint": str(tiny_reward_checkpoint),
                     "hybrid": {"threshold": 0.9, "distill_every": 0}}}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "study"
    assert main(["study", "--config", str(p), "--out", str(out), "--quiet", "--num-cpus", "1"]) == 0
    r = json.loads((out / "study.json").read_text())
    sources = ["bias", "mf", "reward_model", "hybrid"]
    assert r["sources"] == sources and r["seeds"] == 2
    # The matrix: every policy judged by every source; the diagonal is each policy's own simulator.
    assert set(r["matrix"]) == set(sources) and all(set(row) == set(sources) for row in r["matrix"].values())
    for n in sources:
        assert len(r["runs"][n]) == 2 and r["real"][n]["hit_rate"]["n"] == 2
        assert 500 <= r["real"][n]["env_steps"] < 1000  # equal env steps for every policy
        assert 0 <= r["real"][n]["hit_rate"]["mean"] <= 1
    # Same held-out users for every source within a seed: the reference strategies agree.
    pops = {n: [x["real"]["popularity"]["hit_rate"] for x in r["runs"][n]] for n in sources}
    assert all(v == pops["bias"] for v in pops.values())
    assert set(r["fidelity_vs_real_spearman"]) == {"nll", "rmse", "tv_sampled", "like_acc_1to9"}
    # Every source answered every test pair and every training reward its policies asked for.
    assert all(r["fidelity"][n]["coverage"] == 1.0 for n in sources)
    assert all(r["reward_accounting"][n]["answered"] == r["reward_accounting"][n]["asked"] >= 1000 for n in sources)
    assert r["fidelity_vs_real_spearman"]["nll"]["excluded_low_coverage"] == {}
    assert r["fidelity_vs_real_spearman"]["nll"]["spearman"] is not None
    assert "popularity-first" in r["answer"]
    assert (out / "matrix.png").stat().st_size > 5000
    html = (out / "report.html").read_text()
    assert "The answer" in html and "matrix.png" in html and "Real held-out behaviour" in html


def test_hybrid_curve_counts_persona_calls_against_persona_only(tmp_path, data_root, cache_root,
                                                                 tiny_reward_checkpoint):
    import tempfile

    from rlsim.commands.ray_session import ray_session
    from rlsim.config import DataConfig
    from rlsim.report import write_study_report
    from rlsim.study import hybrid_curve

    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=str(data_root), cache_dir=str(cache_root),
                      download=False)
    sections = {"candidates": {"k": 10}, "policy": {"train_batch_size": 250, "minibatch_size": 125, "num_epochs": 1,
                                                    "hidden": 16, "users_per_episode": 8,
                                                    "num_envs_per_env_runner": 8}}
    with ray_session(num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rlsh", dir="/tmp")):
        r = hybrid_curve(dcfg, str(tiny_reward_checkpoint), [0, 0.9, 1.01], 1, 250, {"distill_every": 0}, sections,
                         tmp_path / "h", progress=False)
    by = {c["threshold"]: c for c in r["curve"]}
    assert by[0.0]["persona_calls"] > 0 and by[0.0]["calls_saved"] == 0.0
    assert by[1.01]["persona_calls"] == 0 and by[1.01]["calls_saved"] == 1.0
    assert 0 <= by[0.9]["calls_saved"] <= 1
    assert all(0 <= c["real_hit_rate"] <= 1 for c in r["curve"])
    html = write_study_report({"dataset": "ml-100k", "split": "u1", "answer": "-", "sources": []}, tmp_path,
                              hybrid=r).read_text()
    assert "Hybrid reward: persona calls saved" in html and (tmp_path / "hybrid.png").stat().st_size > 5000


def test_the_correlation_leaves_out_sources_with_low_fidelity_coverage():
    from rlsim.study import fidelity_correlation

    def f(nll, coverage):
        return {"nll": nll, "rmse": nll, "tv_sampled": nll, "like_acc_1to9": -nll, "coverage": coverage}

    # llm_persona answered half the test pairs: its NLL (the best) is over the pairs it happened to answer.
    fid = {"a": f(1.0, 1.0), "b": f(2.0, 1.0), "c": f(3.0, 1.0), "llm_persona": f(0.1, 0.5)}
    hits = {"a": [0.3, 0.3], "b": [0.2, 0.2], "c": [0.1, 0.1], "llm_persona": [0.0, 0.0]}
    r = fidelity_correlation(fid, hits, n_boot=50)
    assert r["nll"]["sources"] == ["a", "b", "c"] and r["nll"]["excluded_low_coverage"] == {"llm_persona": 0.5}
    assert r["nll"]["spearman"] == pytest.approx(1.0)
    kept = fidelity_correlation(fid, hits, n_boot=50, min_coverage=0.5)  # explicitly allowed
    assert kept["nll"]["sources"] == ["a", "b", "c", "llm_persona"] and kept["nll"]["spearman"] < 1.0
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
    from rlsim.report import write_study_report

    result = {"dataset": "ml-100k", "split": "u1", "answer": "-", "sources": ["mf", "llm_persona"],
              "fidelity": {"mf": {"method": "ordinal noise", "coverage": 1.0, "nll": 1.3},
                           "llm_persona": {"method": "logprobs", "coverage": 0.5, "nll": 1.1}},
              "fidelity_vs_real_spearman": {"nll": {"spearman": None, "sources": ["mf"],
                                                    "excluded_low_coverage": {"llm_persona": 0.5}}},
              "reward_accounting": {"llm_persona": {"asked": 20, "answered": 17, "failed": 3,
                                                    "failed_by_reason": {"budget": 2, "http_500": 1}}}}
    html = write_study_report(result, tmp_path).read_text()
    assert "llm_persona (0.500)" in html and "budget: 2, http_500: 1" in html and "<th>coverage</th>" in html
