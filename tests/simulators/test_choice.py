"""Choice models (rlsim.simulators.choice) and choice fidelity (rlsim.simulators.choice_fidelity)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rlsim.simulators.base import Session
from rlsim.cowatch import select_dims
from rlsim.simulators.choice import LazyChoice, NeighbourChoice, PopularityChoice, sample_negatives
from rlsim.simulators.choice_fidelity import choice_fidelity, choice_trials


def taste_clusters(seed=0, n_users=120, n_items=200, per_user=30, test_per_user=6):
    """Users in 4 taste groups watch mostly their group's movies; popular movies are shared by all.
    Held-out picks follow the same taste, so neighbours know more than popularity does."""
    rng = np.random.default_rng(seed)
    group_items = np.array_split(np.arange(1, n_items + 1), 4)
    pop = 1 / np.arange(1, n_items + 1) ** 0.8
    rows = []
    for u in range(1, n_users + 1):
        own = group_items[u % 4]
        w = np.where(np.isin(np.arange(1, n_items + 1), own), 6.0, 1.0) * pop
        picks = rng.choice(np.arange(1, n_items + 1), per_user + test_per_user, replace=False, p=w / w.sum())
        rows += [(u, int(i), 4.0, t) for t, i in enumerate(picks)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    test = df.groupby("user_id").tail(test_per_user)
    return df.drop(test.index), test


def test_negatives_are_never_rated_and_seeded():
    train, _ = taste_clusters()
    neg = sample_negatives(train.head(500), train, 3, seed=1)
    rated = set(zip(train.user_id, train.item_id))
    assert len(neg) == 1500 and not any((u, i) in rated for u, i in zip(neg.user_id, neg.item_id))
    assert neg.equals(sample_negatives(train.head(500), train, 3, seed=1))


def test_neighbours_beat_popularity_where_taste_decides():
    train, test = taste_clusters()
    pop = choice_fidelity(PopularityChoice(seed=0).fit(train).probability, train, test)
    nb_model = NeighbourChoice(seed=0).fit(train)
    nb = choice_fidelity(nb_model.probability, train, test)
    assert nb_model.chosen["k"] in NeighbourChoice.K_CHOICES  # chosen on the validation slice
    # The co-watch factors too, by the env feature's own procedure (rlsim.cowatch.select_dims).
    assert nb_model.cowatch_dims == select_dims(train, seed=0)[0] == max(nb_model.cowatch_validation,
                                                                        key=nb_model.cowatch_validation.get)
    assert NeighbourChoice(seed=0, cowatch_dims=32).fit(train).cowatch.dims == 32
    assert nb["summary"]["auc"] > pop["summary"]["auc"] + 0.05
    assert nb["1to9"]["accuracy"] > pop["1to9"]["accuracy"]
    assert pop["summary"]["auc"] > 0.55  # popularity still knows something here
    for f in (pop, nb):
        assert f["1to9"]["trials"] == f["1to1"]["trials"] > 0 and f["1to9"]["users"] == 120


def test_probabilities_are_probabilities_and_the_session_counts():
    train, test = taste_clusters()
    m = NeighbourChoice(seed=0).fit(train)
    u, i = test.user_id.to_numpy(), test.item_id.to_numpy()
    p = m.probability(u, i)
    assert p.shape == (len(u),) and ((p > 0) & (p < 1)).all()
    assert np.array_equal(p, NeighbourChoice(seed=0).fit(train).probability(u, i))  # seeded
    shown = [Session((int(x),), (3.0,)) for x in i]
    assert (m.probability(u, i, shown) == 0).all()
    unknown = m.probability(np.array([10**6]), np.array([10**6]))
    assert np.isfinite(unknown).all()  # an unknown user or movie gets the link's floor, not an error
    # Page odds: on watched-vs-3-unwatched pages the mean probability is near 1/4.
    neg = sample_negatives(test, pd.concat([train, test]), 3, seed=5)
    mean = np.r_[p, m.probability(neg.user_id.to_numpy(), neg.item_id.to_numpy())].mean()
    assert 0.15 < mean < 0.35


def test_lazy_choice_fits_on_first_use():
    train, test = taste_clusters()
    lazy = LazyChoice("popularity", train, seed=0)
    assert lazy._model is None and lazy.name == "popularity"
    p = lazy.probability(test.user_id.to_numpy(), test.item_id.to_numpy())
    assert lazy._model is not None
    np.testing.assert_allclose(p, PopularityChoice(seed=0).fit(train).probability(test.user_id, test.item_id))


def test_choice_fidelity_of_an_oracle_and_of_a_coin():
    train, test = taste_clusters()
    watched = set(zip(test.user_id, test.item_id))
    oracle = choice_fidelity(lambda u, i: np.array([0.9 if (a, b) in watched else 0.1 for a, b in zip(u, i)]),
                             train, test)
    assert oracle["summary"]["auc"] == 1.0 and all(oracle[f"1to{m}"]["accuracy"] == 1.0 for m in (1, 3, 9))
    assert oracle["summary"]["f1_1to9"] == 1.0
    coin = choice_fidelity(lambda u, i: np.full(len(u), 0.3), train, test)
    assert coin["summary"]["auc"] == 0.5 and coin["summary"]["f1_1to9"] == 0.0
    assert abs(coin["1to9"]["accuracy"] - 0.1) < 0.05  # ties broken at random: chance
    t = choice_trials(train, test, 3, seed=0)
    assert (t.groupby("trial")["watched"].sum() == 1).all() and (t.groupby("trial").size() == 4).all()


def test_what_the_user_just_watched_moves_the_neighbours_choice():
    """A session of another group's movies pulls the user's choice toward that group (neighbours of
    what they just watched); popularity ignores it; replayed sessions help the next pick."""
    from rlsim.simulators.choice_fidelity import choice_session_gain

    train, test = taste_clusters()
    m = NeighbourChoice(seed=0).fit(train)
    user = 4  # group 0 (4 % 4)
    rated = set(train[train.user_id == user].item_id)
    group2 = [i for i in range(101, 151) if i not in rated]
    session = Session(tuple(group2[:8]), (5.0,) * 8)
    probe = np.array(group2[8:20])
    users = np.full(len(probe), user)
    without = m.probability(users, probe)
    with_s = m.probability(users, probe, [session] * len(probe))
    assert with_s.mean() > without.mean() * 1.1 and (with_s > without).sum() > (with_s < without).sum()
    pop = PopularityChoice(seed=0).fit(train)
    np.testing.assert_array_equal(pop.probability(users, probe, [session] * len(probe)), pop.probability(users, probe))
    # Sessions that drift to another group: the next pick is better predicted with the session.
    rng = np.random.default_rng(3)
    drift = []
    for u in range(1, 121):
        other = np.array_split(np.arange(1, 201), 4)[(u + 2) % 4]
        seen = set(train[train.user_id == u].item_id)
        picks = [int(i) for i in rng.permutation(other) if i not in seen][:6]
        drift += [(u, i, 4.0, 10_000 + t) for t, i in enumerate(picks)]
    g = choice_session_gain(m.probability, train, pd.DataFrame(drift, columns=train.columns), seed=0)
    assert g["trials"] > 100 and g["auc_gain"] > 0.01


def test_implicit_mf_choice_beats_popularity_where_taste_decides():
    from rlsim.simulators.choice import BPRChoice

    train, test = taste_clusters()
    pop = choice_fidelity(PopularityChoice(seed=0).fit(train).probability, train, test)
    m = BPRChoice(seed=0, epochs=15).fit(train)
    bpr = choice_fidelity(m.probability, train, test)
    assert m.chosen["factors"] in BPRChoice.FACTOR_CHOICES
    assert bpr["summary"]["auc"] > pop["summary"]["auc"] + 0.03
    p = m.probability(np.array([1, 10**6]), np.array([10**6, 1]))  # unknown movie, unknown user
    assert np.isfinite(p).all() and ((p > 0) & (p < 1)).all()
