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
        "reward": {"best_epoch": [7], "epochs_run": 8, "planned_epochs": 8, "stopped_early": False, "val_rmse": 0.93,
                   "val_accuracy": 0.42, "test_rmse": 0.923, "test_accuracy": 0.43, "train_seconds": 100.0,
                   "hyperparameters_from": "config reward: section", "stage_seconds": 120.0},
        "evaluate": {
            "k": 5, "models": {"reward_model": model}, "baselines": GATE,
            "correlations": {"reward_model": {"accuracy~gini": {"spearman": 0.4, "pearson": 0.35}}},
            "histograms": {"values": [1, 2, 3, 4, 5], "real_test": [.1, .1, .3, .3, .2],
                           "reward_model": [0, .05, .4, .5, .05]},
            "fidelity": {"reward_model": {"method": "softmax", "rmse": 0.92, "nll": 1.24, "tv_sampled": 0.011,
                                          "five_star_share": 0.22, "real_five_star_share": 0.223,
                                          "like_acc_1to1": 0.73, "like_acc_1to3": 0.55, "like_acc_1to9": 0.34,
                                          "session_nll_gain": 0.0012, "within_1": 0.9}},
            "policy": {"policy": {"mean_reward": 4.3, "hit_rate": 0.12, "mean_real_rating": 4.4, "real_coverage": 0.1},
                       "random": {"mean_reward": 4.0, "hit_rate": 0.09},
                       "popularity": {"mean_reward": 4.1, "hit_rate": 0.2},
                       "greedy": {"mean_reward": 4.35, "hit_rate": 0.11},
                       "simulator_oracle": {"mean_reward": 4.4, "hit_rate": 0.11},
                       "real_oracle": {"mean_reward": 4.05, "hit_rate": 0.45},
                       "gap_closed": 0.636, "held_out_users": 37,
                       "ndcg": {"k": 10, "users": 12, "policy": 0.96, "popularity": 0.95, "floor": 0.94},
                       "train_users": {"users": 150, "gap_closed": 0.7, "real_hit_rate": {"policy": 0.1}}},
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


def sections(html: str) -> dict[str, str]:
    """<h2>/<h3> heading -> the HTML up to the next heading (what a reader sees under it)."""
    import re

    parts = re.split(r"<h[23]>(.*?)</h[23]>", html)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def assert_sections_have_content(html: str, out_dir, headings) -> None:
    """Each heading exists and holds a filled table or an image that exists on disk."""
    import re

    got = sections(html)
    for h in headings:
        body = next((b for k, b in got.items() if k.startswith(h)), None)
        assert body is not None, f"missing section {h!r}; have {list(got)}"
        cells = re.findall(r"<td>([^<]*)</td>", body)
        imgs = re.findall(r"src='([^']+)'", body)
        assert [c for c in cells if c not in ("", "–")] or imgs, f"section {h!r} is empty"
        for img in imgs:
            assert (out_dir / img).stat().st_size > 5000, img


def test_report_has_every_section_and_figure(tmp_path):
    path = write_report(_summary(), tmp_path, per_user=_per_user())
    html = path.read_text()
    assert_sections_have_content(html, tmp_path, (
        "Data", "Baseline gate", "Reward model training", "Per-user accuracy and NDCG@5", "Gini", "Correlations",
        "Simulated users: fidelity", "Policy on held-out users", "Personas vs reward model", "Stages"))
    policy = sections(html)["Policy on held-out users"]
    assert "37 users" in policy and "simulator oracle" in policy and "real oracle" in policy
    assert "0.4500" in policy and "popularity-first" in policy  # real hit rates are in the table
    assert "train vs validation" not in html and "validation (test)" not in html
    assert "0.0110" in sections(html)["Simulated users: fidelity to real held-out ratings"]
    for png in ("per_user.png", "gini.png", "policy.png", "personas.png", "histograms.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
        assert f"src='{png}'" in html
    # The personas table carries the gate rows too, and the model row is highlighted.
    assert html.count("baseline: global_mean") == 2
    assert "<tr class=\"model\"><td>reward_model" in html
    assert "0.6360" in html  # gap closed (against the simulator oracle)


def test_report_without_optional_stages(tmp_path):
    s = {"dataset": "ml-100k", "split": "u1", "stages": {"baselines": {"baselines": GATE}}}
    html = write_report(s, tmp_path).read_text()
    assert "baseline: mf" in html and "Policy" not in html
    assert not (tmp_path / "policy.png").exists()


def test_gate_rows_put_models_first_and_never_mix_ndcg_cutoffs():
    rows = gate_rows({"m": {"rmse": 0.9, "ndcg@5": 0.8}}, GATE, k=5)
    assert rows[0]["name"] == "m" and rows[0].get("ndcg@10") is None
    assert [r["name"] for r in rows[1:]] == ["baseline: global_mean", "baseline: mf"]
