"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rlsim.data.schema import RatingScale
from rlsim import metrics as M

S5 = RatingScale(1, 5, 1)
S10 = RatingScale(0.5, 5.0, 0.5)


def test_rating_metrics_by_hand():
    y = [1, 2, 3, 4]
    p = [1.4, 3.6, 3.0, 2.0]
    assert M.rmse(y, p) == pytest.approx(math.sqrt((0.16 + 2.56 + 0 + 4) / 4))
    assert M.mae(y, p) == pytest.approx((0.4 + 1.6 + 0 + 2) / 4)
    # snapped: 1, 4, 3, 2 against y -> errors 0, 2, 0, 2
    assert M.exact(y, p, S5) == 0.5
    # off_by_1 is EXACTLY one point off (Lusifer's meaning); within_1 is at most one point off.
    assert M.off_by_1([3, 3, 3, 3], [3, 4, 2, 5], S5) == 0.5
    assert M.within_1([3, 3, 3, 3], [3, 4, 2, 5], S5) == 0.75
    assert M.within_1(y, p, S5) == pytest.approx(M.exact(y, p, S5) + M.off_by_1(y, p, S5))
    # half-star scale snaps to 0.5 steps; one point is two steps
    assert M.exact([3.5], [3.6], S10) == 1.0
    assert M.off_by_1([3.5], [4.4], S10) == 1.0 and M.off_by_1([3.5], [4.8], S10) == 0.0
    assert M.off_by_1([3.5], [3.9], S10) == 0.0 and M.within_1([3.5], [3.9], S10) == 1.0
    assert M.within_1([3.5], [4.8], S10) == 0.0


def test_random_ndcg_is_the_mean_over_all_rankings():
    import itertools

    true = np.array([5, 1, 3, 4], float)
    for k in (1, 2, 4, 10):
        every = [M.ndcg_at_k(true[list(p)], -np.arange(4.0), k) for p in itertools.permutations(range(4))]
        assert M.random_ndcg_at_k(true, k) == pytest.approx(np.mean(every))
    # a constant predictor sits near the floor; a perfect one at 1
    df = pd.DataFrame({"user_id": [1] * 4 + [2] * 3, "rating": [5, 1, 3, 4, 2, 2, 5],
                       "predicted": [5, 1, 3, 4, 2, 2, 5]})
    s = M.ndcg_summary(df, ks=(3,))
    assert s["ndcg@3"] == pytest.approx(1.0) and 0 < s["ndcg_floor@3"] < 1


def test_ndcg_by_hand():
    true = np.array([3, 2, 3, 0, 1, 2], float)
    pred = np.array([6, 5, 4, 3, 2, 1], float)  # ranks in the given order
    dcg = 3 + 2 / math.log2(3) + 3 / 2 + 0 + 1 / math.log2(6) + 2 / math.log2(7)
    idcg = 3 + 3 / math.log2(3) + 2 / 2 + 2 / math.log2(5) + 1 / math.log2(6) + 0
    assert M.ndcg_at_k(true, pred, 6) == pytest.approx(dcg / idcg)
    assert M.ndcg_at_k(true, pred, 1) == pytest.approx(1.0)
    assert M.ndcg_at_k(true, -pred, 2) == pytest.approx((2 + 1 / math.log2(3)) / (3 + 3 / math.log2(3)))
    df = pd.DataFrame({"user_id": [1, 1, 2, 2], "rating": [5, 1, 2, 4], "predicted": [1, 2, 3, 4]})
    nd = M.per_user_ndcg(df, ks=(2,)).set_index("user_id")["ndcg@2"]
    assert nd[2] == pytest.approx(1.0)
    assert nd[1] == pytest.approx((1 + 5 / math.log2(3)) / (5 + 1 / math.log2(3)))


def test_gini_histogram():
    assert M.gini([1, 2, 3, 4, 5], S5) == pytest.approx(0.0)
    # all mass in one of 5 classes: Gini = (n-1)/n
    assert M.gini([4, 4, 4], S5) == pytest.approx(0.8)
    assert 0 < M.gini([4, 4, 3], S5) < 0.8


def test_correlations_and_histograms():
    assert M.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
    h = M.histogram_distance([1, 1, 5, 5], [1, 1, 1, 1], S5)
    assert h["total_variation"] == pytest.approx(0.5)
    assert h["wasserstein"] == pytest.approx(2.0)  # half the mass moves 4 points


def test_per_user_accuracy_and_nan_to_none():
    df = pd.DataFrame({"user_id": [1, 1, 2], "rating": [4, 2, 3], "predicted": [3.7, 3.0, 3.2]})
    acc = M.per_user_accuracy(df, S5)
    assert acc[1] == 0.5 and acc[2] == 1.0
    assert M.nan_to_none({"a": float("nan"), "b": [np.float32(1.5)], "c": np.int64(2)}) == {"a": None, "b": [1.5], "c": 2}
