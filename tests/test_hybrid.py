"""The hybrid simulator: the persona only where the reward model is unsure, cached, within a hard
budget, and distilled back into the reward model."""

from __future__ import annotations

import numpy as np
import pytest

from rlsim.data.schema import RatingScale
from rlsim.errors import ConfigError
from rlsim.simulators.base import Session, Simulator
from rlsim.simulators.hybrid import HybridConfig, HybridSimulator, normalised_entropy

S5 = RatingScale(1, 5, 1)


class Fixed(Simulator):
    """Sure (one-hot on 3) for even items, unsure (uniform) for odd ones."""

    name, method = "fixed", "test"

    def __init__(self):
        self.scale = S5

    def distribution(self, users, items, sessions=None):
        p = np.full((len(items), 5), 0.2)
        even = np.asarray(items) % 2 == 0
        p[even] = [0, 0, 1, 0, 0]
        return p


class Counting(Simulator):
    """Always 5; counts the pairs it was asked."""

    name, method = "persona", "test"

    def __init__(self):
        self.scale, self.asked = S5, 0

    def distribution(self, users, items, sessions=None):
        self.asked += len(users)
        p = np.zeros((len(users), 5))
        p[:, 4] = 1.0
        return p


def test_persona_only_where_unsure_and_cached():
    persona = Counting()
    h = HybridSimulator(Fixed(), persona, HybridConfig(threshold=0.5, distill_every=0))
    users, items = np.array([1, 1, 2, 2]), np.array([10, 11, 12, 13])
    p = h.distribution(users, items)
    assert persona.asked == 2  # items 11 and 13 only
    np.testing.assert_allclose(p[[1, 3]].argmax(1), [4, 4])
    np.testing.assert_allclose(p[[0, 2]].argmax(1), [2, 2])
    h.distribution(users, items)
    assert persona.asked == 2 and h.stats()["from_persona"] == 4  # second time from the cache
    # A different session is a different question.
    h.distribution(users[:2], items[:2], [Session(), Session((5,), (4.0,))])
    assert persona.asked == 3
    assert h.score(users, items)[1] == pytest.approx(5.0)


def test_thresholds_and_hard_budget():
    never = HybridSimulator(Fixed(), Counting(), HybridConfig(threshold=1.01))
    never.distribution(np.arange(6), np.arange(6))
    assert never.persona.asked == 0
    always = HybridSimulator(Fixed(), Counting(), HybridConfig(threshold=0.0, distill_every=0))
    always.distribution(np.arange(6), np.arange(6) * 2 + 1)  # all unsure
    assert always.persona.asked == 6
    capped = HybridSimulator(Fixed(), Counting(), HybridConfig(threshold=0.0, distill_every=0, max_persona_calls=4))
    p = capped.distribution(np.arange(6), np.arange(6) * 2 + 1)
    assert capped.persona.asked == 4 and capped.stats()["persona_calls"] == 4
    np.testing.assert_allclose(p[4:], 0.2)  # past the budget the reward model answers alone
    with pytest.raises(ConfigError):
        HybridConfig(threshold=-1).validate()
    assert normalised_entropy(np.full((1, 5), 0.2))[0] == pytest.approx(1.0)


def test_distillation_moves_the_reward_model_towards_the_persona(tiny_reward_checkpoint, ml100k):
    from rlsim.simulators.reward_model import RewardModelSimulator

    model = RewardModelSimulator.load(str(tiny_reward_checkpoint))
    users = ml100k.ratings["user_id"].to_numpy()[:200]
    items = ml100k.ratings["item_id"].to_numpy()[::-1][:200].copy()
    before = model.score(users, items).mean()
    h = HybridSimulator(model, Counting(), HybridConfig(threshold=0.0, distill_every=100, distill_epochs=3,
                                                        distill_lr=3e-3))
    h.distribution(users, items)
    assert len(h.distilled) == 1 and h.distilled[0]["loss_after"] < h.distilled[0]["loss_before"]
    after = model.score(users, items).mean()
    assert after > before + 0.1  # the persona always says 5; the distilled model leans that way
    # Once the model is sure, a threshold between its old and new uncertainty skips the persona.
    ent = normalised_entropy(model.distribution(users, items))
    assert ent.mean() < normalised_entropy(RewardModelSimulator.load(str(tiny_reward_checkpoint))
                                           .distribution(users, items)).mean()
