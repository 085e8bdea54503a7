"""Co-watch affinity (rlsim.cowatch): PureSVD of who watched what, and the env features built on it."""

import numpy as np
import pandas as pd

from rlsim.cowatch import CoWatch, candidate_features, select_dims


def _two_tastes(n_users: int = 60, seed: int = 0, share_b: int = 2) -> pd.DataFrame:
    """Odd users watch movies 1-10, the others 11-20 (1 user in ``share_b``), each a random 6 of their 10."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        block = np.arange(1, 11) if u % share_b else np.arange(11, 21)
        for i in rng.choice(block, 6, replace=False):
            rows.append((u, int(i), 4.0))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating"])


def test_affinity_follows_who_watched_what():
    train = _two_tastes()
    m = CoWatch(dims=2).fit(train)
    u = 1  # an odd user: movies 1-10
    unseen_same = [i for i in range(1, 11) if not ((train.user_id == u) & (train.item_id == i)).any()]
    s_same = m.score([u] * len(unseen_same), unseen_same)
    s_other = m.score([u] * 10, list(range(11, 21)))
    assert s_same.min() > s_other.max()
    # Unknown users and movies score 0 instead of failing.
    assert m.score([999, u], [1, 999]).tolist() == [0.0, 0.0]


def test_fit_is_reproducible():
    train = _two_tastes()
    a = CoWatch(dims=3, seed=4).fit(train).score(train.user_id, train.item_id)
    b = CoWatch(dims=3, seed=4).fit(train).score(train.user_id, train.item_id)
    assert np.array_equal(a, b)


def test_select_dims_uses_validation_only():
    train = _two_tastes(90, share_b=3)
    dims, acc = select_dims(train, grid=(1, 2, 4), seed=0)
    assert dims in (1, 2, 4) and set(acc) == {1, 2, 4}
    assert acc[dims] == max(acc.values())
    # Two tastes need two factors: one factor spans the larger block only.
    assert acc[2] > acc[1]


def test_candidate_features_rank_and_padding():
    train = _two_tastes()
    m = CoWatch(dims=2).fit(train)
    users = np.array([1, 2])
    cands = np.array([[11, 2, 3, 0], [12, 13, 1, 0]])
    valid = np.array([[True, True, True, False], [True, True, True, False]])
    f = candidate_features(m, users, cands, valid)
    assert f.shape == (2, 4, 2)
    assert (f[:, 3] == 0).all()  # padded
    assert f[0, 0, 1] == 0.0 and f[0, 1:3, 1].max() == 1.0  # user 1 (movies 1-10): 11 ranks last
    assert f[1, 2, 1] == 0.0  # user 2 (movies 11-20): movie 1 ranks last
    assert np.isclose(np.abs(f[..., 0]).max(1), 1.0).all()


def test_session_movies_join_the_history():
    train = _two_tastes()
    m = CoWatch(dims=2).fit(train)
    # A user of movies 11-20 who watched 1-4 in this session moves toward movies 1-10.
    u = 2
    base = m.score([u], [5])[0]
    moved = m.score_with([u], [5], [(1, 2, 3, 4)])[0]
    assert moved > base
    # A movie already in the user's history is not counted twice; an empty session changes nothing.
    seen = train[train.user_id == u].item_id.tolist()
    assert np.isclose(m.score_with([u], [12], [tuple(seen[:2])])[0], m.score([u], [12])[0])
    assert np.allclose(m.score_with([u, 1], [5, 5], [(), ()]), m.score([u, 1], [5, 5]))
    # An unknown user starts from the session alone.
    assert m.score_with([999], [5], [(1, 2)])[0] > 0 == m.score([999], [5])[0]
