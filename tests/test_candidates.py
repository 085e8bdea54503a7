"""RankZero candidates: training items excluded, blend ordering, recall@K on hand-built cases."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rlsim.candidates import CandidatesConfig, build_candidates, item_popularity, recall_at_k, taste_vectors
from rlsim.errors import ConfigError


def _hand_case():
    # 6 items on two text "axes": items 1-3 lean on axis 0, items 4-6 on axis 1.
    items = pd.DataFrame({"item_id": [1, 2, 3, 4, 5, 6]})
    emb = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [0.1, 0.9], [0.2, 0.8]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    train = pd.DataFrame({
        "user_id": [10, 10, 20, 20, 30, 30, 30],
        "item_id": [1, 4, 4, 5, 6, 1, 2],
        "rating": [5.0, 1.0, 5.0, 4.0, 5.0, 5.0, 5.0],
    })
    return train, items, emb


def test_candidates_exclude_training_items_and_follow_taste():
    train, items, emb = _hand_case()
    cfg = CandidatesConfig(k=3, pop_weight=0.0, sim_weight=1.0)
    c = build_candidates(train, items, emb, cfg)
    assert set(c.columns) == {"user_id", "rank", "item_id", "score", "pop_score", "sim_score"}
    seen = set(zip(train.user_id, train.item_id))
    assert not any((u, i) in seen for u, i in zip(c.user_id, c.item_id))
    # User 10 loved item 1 (axis 0) and disliked 4: similarity ranks 2 then 3 first.
    u10 = c[c.user_id == 10].sort_values("rank")
    assert u10.item_id.tolist()[:2] == [2, 3]
    # User 20 likes axis 1: item 6 is the only unrated axis-1 item and comes first.
    assert c[(c.user_id == 20) & (c["rank"] == 0)].item_id.item() == 6
    assert (c.groupby("user_id").size() == 3).all()
    # Ranks are ordered by score.
    for _, g in c.groupby("user_id"):
        assert np.all(np.diff(g.sort_values("rank").score.to_numpy()) <= 1e-12)


def test_popularity_only_and_damping():
    train, items, emb = _hand_case()
    pop = item_popularity(train, items.item_id.to_numpy(), damping=0.0, count_weight=0.0)
    # Without damping the popularity is the raw mean; item 3 has no ratings, so the global mean.
    mu = train.rating.mean()
    assert pop.damped_mean.tolist() == pytest.approx([5.0, 5.0, mu, 3.0, 4.0, 5.0])
    c = build_candidates(train, items, emb, CandidatesConfig(k=2, pop_weight=1.0, sim_weight=0.0,
                                                           damping=0.0, count_weight=0.0))
    # User 20's unrated items by mean: 1 (5.0), 2 (5.0), 6 (5.0) beat 3 (mu).
    assert set(c[c.user_id == 20].item_id) <= {1, 2, 6}


def test_taste_vector_uses_items_at_or_above_user_mean():
    train, items, emb = _hand_case()
    idx = pd.Series(np.arange(6), index=items.item_id)
    t = taste_vectors(train, np.array([10]), idx, emb)
    # User 10's mean is 3: only item 1 (rating 5) counts, so the taste vector is item 1's embedding.
    np.testing.assert_allclose(t[0], emb[0], atol=1e-6)


def test_recall_hand_built():
    cands = pd.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [10, 11, 20, 21]})
    test = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 3], "item_id": [10, 12, 13, 22, 21, 30],
                         "rating": [5, 4, 2, 4, 1, 5]})
    r = recall_at_k(cands, test, like_threshold=4)
    # user 1: liked {10, 12} -> 1/2; user 2: liked {22} -> 0; user 3: liked {30}, no candidates -> 0.
    assert r["recall"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert r["users"] == 3 and r["hits"] == 1 and r["liked"] == 4


def test_config_validation():
    with pytest.raises(ConfigError):
        CandidatesConfig(k=0).validate()
    with pytest.raises(ConfigError):
        CandidatesConfig(pop_weight=0, sim_weight=0).validate()


def test_cli_build(data_root, cache_root, tmp_path):
    from rlsim.cli import main

    out = tmp_path / "cands"
    rc = main(["candidates", "build", "--dataset", "ml-100k", "--data-dir", str(data_root), "--cache-dir",
               str(cache_root), "--no-download", "--out", str(out), "--k", "10", "--weights", "0.3,0.7"])
    assert rc == 0
    c = pd.read_parquet(out / "candidates.parquet")
    m = json.loads((out / "metrics.json").read_text())
    assert c.groupby("user_id").size().max() == 10
    assert m["candidates"]["weights"] == {"pop": 0.3, "sim": 0.7}
    for name in ("popularity", "similarity", "blend"):
        assert 0.0 <= m["candidates"][name]["recall"] <= 1.0
    assert "baselines" in m
    assert main(["candidates", "build", "--dataset", "ml-100k", "--data-dir", str(data_root), "--cache-dir",
                 str(cache_root), "--out", str(out), "--weights", "x"]) == 2


def test_weights_are_chosen_on_training_validation_never_on_test(ml100k):
    from rlsim.candidates import candidates_stage
    from rlsim.data import make_split

    split = make_split(ml100k, "u1")
    emb = np.random.default_rng(0).normal(size=(len(ml100k.items), 16)).astype(np.float32)
    cfg = CandidatesConfig(k=10, sim_weight_grid=[0.0, 0.5, 1.0])
    _, a = candidates_stage(split.train, split.test, ml100k.items, emb, cfg)
    # A test set that says every held-out movie was loved, or hated, changes nothing about the choice.
    _, b = candidates_stage(split.train, split.test.assign(rating=5.0), ml100k.items, emb, cfg)
    _, c = candidates_stage(split.train, split.test.assign(rating=1.0), ml100k.items, emb, cfg)
    assert a["tuning"] == b["tuning"] == c["tuning"]
    assert a["weights_from"] == "validation slice of training"
    best = max(a["tuning"]["grid"], key=lambda g: g["validation_recall"])
    assert a["weights"] == {"pop": best["pop_weight"], "sim": best["sim_weight"]}
    assert c["blend"]["recall"] != c["blend"]["recall"] or c["blend"]["liked"] == 0  # no liked items: NaN recall
    _, fixed = candidates_stage(split.train, split.test, ml100k.items, emb,
                                CandidatesConfig(k=10, tune_weights=False, pop_weight=0.3, sim_weight=0.7))
    assert fixed["weights"] == {"pop": 0.3, "sim": 0.7} and "tuning" not in fixed
