"""The offline persona's sparse similarities: the same answers as the dense item x item version,
memory that grows with ratings (not movies squared), and its ML-100K u1 fidelity."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from rlsim.data import make_split
from rlsim.data.schema import RatingScale
from rlsim.personas.backends.offline import OfflinePersona
from rlsim.personas.config import OfflineConfig


def dense_similarity(model: OfflinePersona, train: pd.DataFrame, item_ids, item_vectors) -> np.ndarray:
    """The item x item matrix the persona used to build (residual cosine over common raters damped
    by their count, plus the floored text cosine), from the fitted model's residuals."""
    cfg = model.cfg
    R = model._R.toarray()
    M = model._M.toarray()
    num = R @ R.T
    sq = (R ** 2) @ M.T
    den = np.sqrt(sq * sq.T)
    common = M @ M.T
    with np.errstate(invalid="ignore", divide="ignore"):
        S = np.where(den > 0, num / den, 0.0) * common / (common + cfg.shrink)
    if item_vectors is not None and cfg.text_weight > 0:
        V = model._V
        T = np.clip((V @ V.T - cfg.text_floor) / (1.0 - cfg.text_floor), 0.0, None)
        S = S + cfg.text_weight * T
    np.fill_diagonal(S, 0.0)
    return S.astype(np.float32)


def _vectors(items: pd.DataFrame, d: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(len(items), d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("with_text", [True, False])
def test_similarity_blocks_equal_the_dense_matrix(ml100k, with_text):
    split = make_split(ml100k, "u1")
    vec = _vectors(ml100k.items) if with_text else None
    m = OfflinePersona(OfflineConfig(stack=False)).fit(split.train, ml100k.scale, ml100k.items["item_id"].to_numpy(), vec)
    S = dense_similarity(m, split.train, ml100k.items["item_id"].to_numpy(), vec)
    rng = np.random.default_rng(0)
    t = rng.choice(len(m.items), 15, replace=False)
    h = np.r_[rng.choice(len(m.items), 30, replace=False), t[:3]]  # some targets are in the history
    np.testing.assert_allclose(m.similarity(t, h), S[np.ix_(t, h)], atol=1e-6)
    assert (m.similarity(t, t).diagonal() == 0).all()


def test_predictions_equal_the_dense_version(ml100k):
    """Predict with the sparse blocks, and again with the dense matrix in their place."""
    split = make_split(ml100k, "u1")
    ids, vec = ml100k.items["item_id"].to_numpy(), _vectors(ml100k.items)
    for cfg in (OfflineConfig(), OfflineConfig(stack=False, mf_weight=0.0), OfflineConfig(k=3)):
        m = OfflinePersona(cfg).fit(split.train, ml100k.scale, ids, vec)
        u, i = split.test["user_id"].to_numpy(), split.test["item_id"].to_numpy()
        sparse_raw = m.predict_raw(u, i)
        S = dense_similarity(m, split.train, ids, vec)
        m.similarity = lambda t, h, S=S: S[np.ix_(t, h)]
        np.testing.assert_allclose(sparse_raw, m.predict_raw(u, i), atol=1e-6)
        assert np.array_equal(m.predict(u, i), ml100k.scale.round(sparse_raw) if cfg.snap else sparse_raw)


def test_memory_grows_with_ratings_not_items_squared():
    """4,000 movies, 6,000 ratings: a dense item x item float64 matrix alone would be 128 MB."""
    rng = np.random.default_rng(0)
    n_items, n_users = 4000, 200
    rows = [(u, int(i), float(rng.integers(1, 6)), 0) for u in range(n_users)
            for i in rng.choice(n_items, 30, replace=False)]
    train = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    ids = np.arange(n_items)
    vec = rng.normal(size=(n_items, 32)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    scale = RatingScale(1.0, 5.0, 1.0)
    tracemalloc.start()
    m = OfflinePersona(OfflineConfig()).fit(train, scale, ids, vec)
    pred = m.predict(np.repeat(np.arange(20), 5), rng.choice(n_items, 100))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(pred) == 100 and np.isfinite(pred).all()
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MB"
    big = [k for k, v in vars(m).items() if isinstance(v, np.ndarray) and v.size >= n_items * n_items // 4]
    assert not big


def test_repeated_pairs_get_one_similarity_row_in_bounded_blocks(ml100k):
    """The session replay asks each held-out movie up to 20 times per user: one similarity row per
    (user, movie), in blocks of at most block_cells (target x history) cells, the same answers."""
    split = make_split(ml100k, "u1")
    ids, vec = ml100k.items["item_id"].to_numpy(), _vectors(ml100k.items)
    m = OfflinePersona(OfflineConfig(stack=False, mf_weight=0.0)).fit(split.train, ml100k.scale, ids, vec)
    test = split.test[split.test["user_id"].isin([13, 405, 655])]  # ML-100K's longest histories
    u, i = np.repeat(test["user_id"].to_numpy(), 20), np.repeat(test["item_id"].to_numpy(), 20)
    S = dense_similarity(m, split.train, ids, vec)
    calls = []

    def recorded(t, h):
        calls.append((np.asarray(t).copy(), len(h)))
        return S[np.ix_(t, h)]

    m.similarity = recorded
    m.block_cells = 20_000
    got = m.predict_raw(u, i)
    assert calls and all(len(np.unique(t)) == len(t) for t, _ in calls)
    assert all(len(t) * n <= m.block_cells or len(t) == 1 for t, n in calls)
    assert sum(len(t) for t, _ in calls) == len(test)  # each (user, movie) once, not 20 times
    # The same answers as one pair at a time (every row from the dense matrix).
    one = np.concatenate([m.predict_raw([a], [b]) for a, b in zip(test["user_id"], test["item_id"])])
    np.testing.assert_array_equal(got, np.repeat(one, 20))


def test_stacking_holdout_is_capped(ml100k):
    split = make_split(ml100k, "u1")
    small = dataclasses.replace(OfflineConfig())
    m = OfflinePersona(small)
    m.max_stack_pairs = 50  # whole users, up to 50 hold-out pairs
    m.fit(split.train, ml100k.scale)
    assert m.weights is not None and np.isfinite(m.weights).all()
    assert np.isfinite(m.predict(split.test["user_id"], split.test["item_id"])).all()


@pytest.mark.realdata
def test_ml100k_u1_fidelity_does_not_get_worse(real_data_dir, cache_root):
    """The numbers in docs/personas.md: RMSE 0.957 snapped / 0.914 unsnapped on all 20,000 u1 test pairs."""
    from rlsim.data import load_movielens
    from rlsim.embeddings import item_text_vectors

    ds = load_movielens("ml-100k", data_dir=real_data_dir, cache_dir=cache_root, download=False)
    split = make_split(ds, "u1")
    vec = item_text_vectors(ds.items, "all-MiniLM-L6-v2", cache_root)
    m = OfflinePersona(OfflineConfig()).fit(split.train, ds.scale, ds.items["item_id"].to_numpy(), vec)
    raw = m.predict_raw(split.test["user_id"].to_numpy(), split.test["item_id"].to_numpy())
    y = split.test["rating"].to_numpy(float)
    assert len(y) == 20_000
    assert np.sqrt(np.mean((ds.scale.round(raw) - y) ** 2)) <= 0.9575
    assert np.sqrt(np.mean((raw - y) ** 2)) <= 0.9140
