"""Per-user outcomes the study's bootstrap runs over: hit, watched, slate NDCG, random, coverage."""

from __future__ import annotations

import numpy as np
import pytest

from rlsim.env import EnvData
from rlsim.metrics import ndcg_at_k, random_ndcg_at_k
from rlsim.policy.evaluate import coverage, pick_outcomes, random_outcomes, slate_ndcg


def _data():
    items = np.array([[10, 11, 12, 13], [10, 14, 15, 0], [16, 17, 18, 19]])
    valid = items > 0
    U, K = items.shape
    return EnvData(user_ids=np.array([1, 2, 3]), cand_items=items, cand_valid=valid,
                   user_feat=np.zeros((U, 2), np.float32), cand_feat=np.zeros((U, K, 2), np.float32),
                   pop_score=np.tile(np.arange(K, 0, -1), (U, 1)).astype(float), user_mean=np.full(U, 3.5),
                   scale_min=1.0, scale_max=5.0)


REAL = np.array([[5.0, np.nan, 2.0, 4.0], [np.nan, 3.0, np.nan, np.nan], [np.nan] * 4])


def test_hit_and_watched_per_user():
    d = _data()
    o = pick_outcomes(d, REAL, np.array([0, 1, 0]), 4.0)
    assert list(o["hit"]) == [1.0, 0.0, 0.0] and list(o["watched"]) == [1.0, 1.0, 0.0]
    o = pick_outcomes(d, REAL, np.array([2, 3, 1]), 4.0)  # user 2's pick 3 is padding: invalid
    assert list(o["hit"]) == [0.0, 0.0, 0.0] and list(o["watched"]) == [1.0, 0.0, 0.0]


def test_slate_ndcg_matches_the_metric_by_hand_and_names_undefined_users():
    d = _data()
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.2, 0.1, 0.3, 9.0], [1, 2, 3, 4]], float)
    got = slate_ndcg(d, REAL, scores, k=2)
    gain0 = np.array([5.0, 0.0, 2.0, 4.0])
    assert got[0] == pytest.approx(ndcg_at_k(gain0, scores[0], 2))
    assert got[1] == pytest.approx(ndcg_at_k(np.array([0.0, 3.0, 0.0]), scores[1, :3], 2))  # padding never ranks
    assert np.isnan(got[2])  # no held-out-rated candidate: not in the denominator
    r = random_outcomes(d, REAL, 4.0, k=2)
    assert r["hit"][0] == pytest.approx(2 / 4) and r["watched"][0] == pytest.approx(3 / 4)
    assert r["watched"][1] == pytest.approx(1 / 3) and r["hit"][2] == 0.0
    assert r["ndcg"][0] == pytest.approx(random_ndcg_at_k(gain0, 2))
    assert r["ndcg"][1] == pytest.approx(random_ndcg_at_k(np.array([0.0, 3.0, 0.0]), 2)) and np.isnan(r["ndcg"][2])


def test_coverage_counts_distinct_picks_over_distinct_candidates():
    d = _data()
    c = coverage(d, np.array([0, 0, 0]))  # items 10, 10, 16 of 10 distinct candidate items
    assert c == {"coverage": pytest.approx(0.2), "distinct_picked": 2, "distinct_candidates": 10}


def test_hybrid_curve_ends_and_the_middle_judged_against_both():
    from rlsim.study_real import curve_ends, curve_vs_ends

    assert curve_ends([{"threshold": t} for t in (0.0, 0.9, 1.01)]) == (0.0, 1.01)
    assert curve_ends([{"threshold": t} for t in (0.0, 0.9)]) is None  # no end that never asks the persona
    rng = np.random.default_rng(0)
    base = (rng.uniform(size=(3, 80)) < 0.3).astype(float)
    per_user = {0.0: list(base), 1.01: list(base), 0.9: list(np.maximum(base, rng.uniform(size=(3, 80)) < 0.4)),
                0.5: list(base)}
    v = curve_vs_ends(per_user, (0.0, 1.01), 500, 0)
    assert set(v) == {0.9, 0.5} and v[0.9]["better"] is True and v[0.5]["better"] is False
    assert curve_vs_ends(per_user, None, 500, 0) == {}


def test_a_shortfall_splits_into_its_choice_and_rating_parts():
    from rlsim.study_real import shortfall, shortfall_text
    from rlsim.study_stats import bootstrap_indices

    rng = np.random.default_rng(0)
    S, U = 3, 400
    pop_w = (rng.random((S, U)) < 0.5).astype(float)
    pop_h = pop_w * (rng.random((S, U)) < 0.8)
    # "shy": watched half as often as popularity's picks, liked as often when watched (the choice question);
    # "sour": watched as often, liked half as often when watched (the rating question).
    shy_w = pop_w * (rng.random((S, U)) < 0.5)
    shy_h = shy_w * (rng.random((S, U)) < 0.8)
    sour_w = pop_w.copy()
    sour_h = sour_w * (rng.random((S, U)) < 0.4)
    outcomes = {"hit": {"popularity": pop_h, "shy": shy_h, "sour": sour_h},
                "watched": {"popularity": pop_w, "shy": shy_w, "sour": sour_w}}
    idx = bootstrap_indices(S, U, 300, seed=0)
    r = shortfall(outcomes, ["shy", "sour"], idx)
    for n in ("shy", "sour"):  # the two parts add up to the whole hit-rate gap
        row = r["sources"][n]
        gap = outcomes["hit"][n].mean() - pop_h.mean()
        assert row["choice"] + row["rating"] == pytest.approx(gap)
        for part in ("choice", "rating"):
            lo, hi = row[f"{part}_ci95"]
            assert lo <= row[part] <= hi
    shy, sour = r["sources"]["shy"], r["sources"]["sour"]
    assert shy["choice"] < -0.1 and abs(shy["rating"]) < 0.05 and shy["choice_ci95"][1] < 0
    assert sour["rating"] < -0.1 and sour["choice"] == pytest.approx(0.0) and sour["rating_ci95"][1] < 0
    assert shortfall(outcomes, ["shy"], idx)["question"] == "choice"
    assert shortfall(outcomes, ["sour"], idx)["question"] == "rating"
    assert "which movie the user watches next" in shortfall_text(shortfall(outcomes, ["shy"], idx))
    assert shortfall_text(None) == ""
