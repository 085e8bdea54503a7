"""Time-local popularity (rlsim.recency) and the choice models' recency feature (rlsim.simulators.choice).

Synthetic data where the right answer is known: the catalogue's old movies were watched most, over
the whole history, but late users watch the new releases of their own time. A time-blind choice
model ranks the old hits first; the time-local feature, chosen on the training validation slice,
sees the trend.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rlsim.data.splits import temporal_validation
from rlsim.recency import DAY, TimeLocalPopularity
from rlsim.simulators.choice import NeighbourChoice, PopularityChoice
from rlsim.simulators.choice_fidelity import choice_fidelity


def trend(seed=0, n_users=160, per_user=30):
    """Movies 1-100 are the old hits (watched in year one), 101-200 the new releases of year three.
    Three in four users are active in year one, the rest in year three; each watches mostly the
    movies of their own time, by popularity. The last 20% of each user's ratings by time are the test."""
    rng = np.random.default_rng(seed)
    old, new = np.arange(1, 101), np.arange(101, 201)
    pop = 1 / np.arange(1, 101) ** 0.7
    rows = []
    for u in range(1, n_users + 1):
        late = u % 4 == 0
        own, other = (new, old) if late else (old, new)
        w = np.r_[pop * 8, pop] / np.r_[pop * 8, pop].sum()
        picks = rng.choice(np.r_[own, other], per_user, replace=False, p=w)
        start = (730 if late else 0) + rng.uniform(0, 300)
        t = np.sort(start + rng.uniform(0, 30, per_user)) * DAY
        rows += [(u, int(i), 4.0, int(s)) for i, s in zip(picks, t)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return temporal_validation(df, 0.2, seed)


def test_time_local_popularity_follows_the_user_time():
    train, _ = trend()
    m = TimeLocalPopularity(half_life=30).fit(train)
    late, early = 4, 1  # user 4 is active in year three, user 1 in year one
    s_new = m.score([late, late, early, early], [101, 1, 101, 1])
    assert s_new[0] > s_new[1] and s_new[3] > s_new[2]  # each user's own era's hit counts most
    # Rescaled to the global count: summed over the catalogue a user's local counts are all the picks.
    items = np.unique(train["item_id"])
    total = m.score(np.full(len(items), late), items).sum()
    assert abs(total - len(train.drop_duplicates(["user_id", "item_id"]))) < 1e-6 * total
    assert m.score([10**6], [1])[0] == 0.0 and m.score([late], [10**6])[0] == 0.0  # unknown: 0
    # A long half-life forgets time: every user sees the global counts.
    flat = TimeLocalPopularity(half_life=1e9).fit(train)
    assert np.allclose(flat.score([late], [1]), flat.score([early], [1]), rtol=1e-6)
    # The whole-profile kernel (user_half_life inf): every one of the user's times alike.
    both = TimeLocalPopularity(30, float("inf")).fit(train).score([late], [101])
    assert np.isfinite(both).all() and both[0] > 0


def test_recency_sees_a_trend_that_time_blind_popularity_misses():
    train, test = trend()
    blind = PopularityChoice(seed=0, recency_grid=(None,)).fit(train)
    timed = PopularityChoice(seed=0).fit(train)  # the default: the time kernel chosen on the link slice
    assert blind.chosen["time_kernel"] is None
    assert timed.chosen["time_kernel"] in PopularityChoice.RECENCY and timed.chosen["time_kernel"] is not None
    assert timed.validation_log_loss < blind.validation_log_loss
    late_test = test[test["user_id"] % 4 == 0]
    a = choice_fidelity(blind.probability, train, late_test, ratios=(9,))["summary"]
    b = choice_fidelity(timed.probability, train, late_test, ratios=(9,))["summary"]
    assert b["auc"] > a["auc"] + 0.1 and b["acc_1to9"] > a["acc_1to9"]
    p = timed.probability(late_test["user_id"].to_numpy(), late_test["item_id"].to_numpy())
    assert ((p > 0) & (p < 1)).all()


def test_without_timestamps_there_is_no_time_feature():
    train, _ = trend()
    m = PopularityChoice(seed=0).fit(train.assign(timestamp=0))
    assert m.chosen["time_kernel"] is None and m.recency is None
    assert m.w.shape == (3,)  # two features and the bias


def test_neighbours_stay_time_blind_unless_asked():
    train, test = trend(n_users=80)
    assert NeighbourChoice(seed=0, k=10).fit(train).chosen["time_kernel"] is None
    m = NeighbourChoice(seed=0, k=10, recency_grid=PopularityChoice.RECENCY).fit(train)
    assert m.chosen["time_kernel"] in PopularityChoice.RECENCY
    p = m.probability(test["user_id"].to_numpy(), test["item_id"].to_numpy())
    assert p.shape == (len(test),) and np.isfinite(p).all()


def test_the_kernel_table_stays_small_at_any_size():
    train, _ = trend()
    m = TimeLocalPopularity(30, max_cells=160 * 10).fit(train)  # 160 users: at most 10 bins
    assert m.uk_.shape[1] <= 10
    late, early = 4, 1
    s = m.score([late, late, early, early], [101, 1, 101, 1])
    assert s[0] > s[1] and s[3] > s[2]  # coarse bins still tell the eras apart
