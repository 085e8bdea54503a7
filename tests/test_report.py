"""Report rendering from hand-made metrics: every section, the gate beside every model table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rlsim.report import gate_rows, write_report

GATE = {"global_mean": {"rmse": 1.15, "mae": 0.95, "exact": 0.31, "off_by_1": 0.75, "ndcg@10": 0.85, "n": 100},
        "mf": {"rmse": 0.95, "mae": 0.75, "exact": 0.40, "off_by_1": 0.90, "ndcg@10": 0.88, "n": 100}}


def _summary():
    model = {"rmse": 0.91, "mae": 0.72, "exact": 0.43, "off_by_1": 0.92, "ndcg@5": 0.89, "ndcg@10": 0.87, "n": 100}
    return {"dataset": "ml-100k", "split": "u1", "ran": [], "stages": {
        "data": {"dataset": "ml-100k", "ratings": 1000, "users": 50, "items": 80, "train": 800, "test": 200,
                 "stage_seconds": 0.1},
        "baselines": {"baselines": GATE, "stage_seconds": 1.0},
        "evaluate": {
            "k": 5, "models": {"reward_model": model}, "baselines": GATE,
            "correlations": {"reward_model": {"accuracy~gini": {"spearman": 0.4, "pearson": 0.35}}},
            "histograms": {"values": [1, 2, 3, 4, 5], "real_test": [.1, .1, .3, .3, .2],
                           "reward_model": [0, .05, .4, .5, .05]},
            "histogram_distance": {"reward_model": {"total_variation": 0.25, "wasserstein": 0.3}},
            "policy": {"policy": {"mean_reward": 0.8}, "random": {"mean_reward": 0.1},
                       "oracle": {"mean_reward": 1.2}, "gap_closed": 0.636},
            "personas": {"persona": {"exact": 0.3, "off_by_1": 0.8, "ndcg@5": 0.8, "rmse": 1.1},
                         "reward_model": {"exact": 0.42, "off_by_1": 0.9, "ndcg@5": 0.87, "rmse": 0.93},
                         "baselines": GATE},
            "stage_seconds": 2.0}}}


def _per_user():
    rng = np.random.default_rng(0)
    rows = []
    for model in ("reward_model", "mf"):
        for side in ("train", "test"):
            for u in range(40):
                rows.append({"user_id": u, "model": model, "side": side, "accuracy": rng.uniform(0.2, 0.7),
                             "ndcg@5": rng.uniform(0.7, 1.0), "gini": rng.uniform(0.1, 0.6), "n_train": 20})
    return pd.DataFrame(rows)


def test_report_has_every_section_and_figure(tmp_path):
    path = write_report(_summary(), tmp_path, per_user=_per_user())
    html = path.read_text()
    for heading in ("Baseline gate", "Per-user accuracy and NDCG@5", "Gini", "Correlations",
                    "Policy vs random vs oracle", "Personas vs reward model", "Rating histograms"):
        assert heading in html, heading
    for png in ("per_user.png", "gini.png", "policy.png", "personas.png", "histograms.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
        assert f"src='{png}'" in html
    # The personas table carries the gate rows too, and the model row is highlighted.
    assert html.count("baseline: global_mean") == 2
    assert "<tr class=\"model\"><td>reward_model" in html
    assert "0.6360" in html  # gap closed


def test_report_without_optional_stages(tmp_path):
    s = {"dataset": "ml-100k", "split": "u1", "stages": {"baselines": {"baselines": GATE}}}
    html = write_report(s, tmp_path).read_text()
    assert "baseline: mf" in html and "Policy" not in html
    assert not (tmp_path / "policy.png").exists()


def test_gate_rows_put_models_first_and_never_mix_ndcg_cutoffs():
    rows = gate_rows({"m": {"rmse": 0.9, "ndcg@5": 0.8}}, GATE, k=5)
    assert rows[0]["name"] == "m" and rows[0].get("ndcg@10") is None
    assert [r["name"] for r in rows[1:]] == ["baseline: global_mean", "baseline: mf"]
