"""BPR (the study's implicit reference): it learns who watches what, chosen on a validation slice."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rlsim.bpr import BPR, select_bpr, validation_slice
from rlsim.errors import ConfigError


def _two_tastes(seed=0):
    """Users 0-39 watch items 0-19, users 40-79 items 20-39, each a random 12 of their 20."""
    rng = np.random.default_rng(seed)
    rows = [(u, int(i), 3) for u in range(80) for i in rng.choice(20, 12, replace=False) + (0 if u < 40 else 20)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating"])


def test_bpr_ranks_a_users_unwatched_taste_above_the_other_taste():
    train = _two_tastes()
    m = BPR(factors=8, epochs=40, seed=0).fit(train)
    seen = set(zip(train.user_id, train.item_id))
    own, other = [], []
    for u in range(80):
        mine = range(0, 20) if u < 40 else range(20, 40)
        theirs = range(20, 40) if u < 40 else range(0, 20)
        own += [m.score(np.array([u]), np.array([i]))[0] for i in mine if (u, i) not in seen]
        other += [m.score(np.array([u]), np.array([i]))[0] for i in theirs]
    assert np.mean(own) > np.mean(other) and np.mean(np.array(own)[:, None] > np.array(other)[None, :]) > 0.9
    assert np.isnan(m.score(np.array([0]), np.array([999]))[0])  # never watched in training
    assert np.isfinite(m.score(np.array([12345]), np.array([3]))[0])  # unknown user: the item's bias
    with pytest.raises(ConfigError, match="at least one"):
        BPR().fit(train.iloc[:0])


def test_select_bpr_uses_a_training_validation_slice_and_keeps_the_best_setting():
    train = _two_tastes(1)
    fit, val = validation_slice(train, seed=0)
    assert len(val) == 80 and len(fit) + len(val) == len(train)
    assert not set(zip(val.user_id, val.item_id)) & set(zip(fit.user_id, fit.item_id))
    grid = [{"factors": 8, "reg": 0.01, "epochs": 40}, {"factors": 8, "reg": 0.01, "epochs": 0}]
    model, sel = select_bpr(train, grid, seed=0)
    aucs = sel["validation_auc"]
    # Untrained (random factors) is near chance; trained is far above it.
    assert aucs["factors=8, reg=0.01, epochs=40"] > 0.8 and aucs["factors=8, reg=0.01, epochs=0"] < 0.7
    assert sel["chosen"]["epochs"] == 40 and model.epochs == 40
