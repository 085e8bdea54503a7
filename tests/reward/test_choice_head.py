"""The reward model's "dot" choice head (its own pass over the user's tokens, or read off the rating
pass): its negatives (a seeded shared pool, rated movies never passed over, weighted to
reward.choice_negatives per pick), its scoring (the user side never sees the movie being scored; a
session moves it) and the loading of checkpoints saved with the "joint" head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlsim.data.schema import RatingScale
from rlsim.errors import ConfigError
from rlsim.reward.config import RewardConfig
from rlsim.reward.features import build_features
from rlsim.reward.loop import _choice_batch, choice_loss, pool_batch, rated_mask, tensors, train_step
from rlsim.reward.model import VanillaTransformer
from tests.reward.tiny import tiny_ratings

CFG = dict(dim=16, heads=2, ff_dim=32, text_hidden=16, dropout=0.0, choice_weight=1.0, choice_scorer="dot",
           choice_pool=64, batch_size=32)


@pytest.fixture(scope="module")
def tables():
    train, items, users, text = tiny_ratings(400, 40)
    ft = build_features(items, users, train.reset_index(drop=True), text)
    return ft, train.reset_index(drop=True), RatingScale(1, 5, 1)


def test_pool_negatives_are_seeded_weighted_and_never_rated(tables):
    ft, train, scale = tables
    cfg = RewardConfig(**CFG)
    tr = tensors(ft, train, scale, "cpu", choice=True)
    b = torch.arange(32)
    n_items = ft.n_items
    pool, w = pool_batch(tr, tr["user"][b], n_items, cfg, torch.Generator().manual_seed(3))
    assert pool.shape == (cfg.choice_pool,) and w.shape == (32, cfg.choice_pool)
    assert ((pool >= 1) & (pool < n_items)).all()  # row 0 is the unknown movie
    rated = {(int(u), int(i)) for u, i in zip(ft.hist_users, ft.hist_items)}
    for r in range(32):
        for j in range(cfg.choice_pool):
            is_rated = (int(tr["user"][r]), int(pool[j])) in rated
            assert w[r, j] == (0.0 if is_rated else cfg.choice_negatives / cfg.choice_pool)
    assert (w == 0).any()  # the fixture's users rated some of the pool: the check above saw both cases
    # A pick weighs against at most choice_negatives unrated movies (the learnt odds), less its rated draws.
    assert (w.sum(1) <= cfg.choice_negatives + 1e-6).all() and (w.sum(1) > 0).all()
    again, w2 = pool_batch(tr, tr["user"][b], n_items, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(pool, again) and torch.equal(w, w2)
    other, _ = pool_batch(tr, tr["user"][b], n_items, cfg, torch.Generator().manual_seed(4))
    assert not torch.equal(pool, other)
    # The picks themselves are rated: a pick drawn into the pool is no negative of its own row.
    assert rated_mask(tr["hist_keys"], tr["user"][b], tr["item"][b], n_items).all()


def test_joint_draws_stand_for_the_configured_odds(tables):
    """reward.choice_draws: fewer rows drawn per pick (each a whole forward), weighted to the same odds."""
    ft, train, scale = tables
    tr = tensors(ft, train, scale, "cpu", choice=True)
    model = VanillaTransformer(RewardConfig(**{**CFG, "choice_scorer": "joint"}), ft, scale.values)
    b = torch.arange(32)
    u, i = tr["user"][b], tr["item"][b]
    for k, odds in ((3, 3), (1, 3), (2, 6)):
        inputs, labels, weights = _choice_batch(model, tr, b, u, i, u, i, k, torch.Generator().manual_seed(0), odds)
        assert len(labels) == 32 * (k + 1) and labels[:32].eq(1).all() and labels[32:].eq(0).all()
        rated = rated_mask(tr["hist_keys"], inputs["real_user"][32:], inputs["real_item"][32:], ft.n_items)
        assert torch.equal(weights[32:], (~rated).float() * (odds / k)) and weights[:32].eq(1).all()
        assert torch.equal(inputs["real_user"][32:], u.repeat_interleave(k))
    with pytest.raises(ConfigError):
        RewardConfig(choice_draws=-1).validate()


def test_choice_loss_labels_picks_one_and_the_pool_zero():
    pick, pool = torch.tensor([2.0, -1.0]), torch.tensor([[0.5, -3.0], [1.0, 0.0]])
    w = torch.tensor([[1.5, 0.0], [1.0, 0.5]])
    expected = -torch.nn.functional.logsigmoid(pick).sum() - (w * torch.nn.functional.logsigmoid(-pool)).sum()
    torch.testing.assert_close(choice_loss(pick, pool, w), expected)


@pytest.mark.parametrize("shared", [False, True])
def test_dot_head_scores_the_user_side_without_the_movie_and_follows_the_session(tables, shared):
    ft, train, scale = tables
    torch.manual_seed(0)
    model = VanillaTransformer(RewardConfig(**CFG, choice_shared_pass=shared), ft, scale.values).eval()
    assert model.has_choice and model.choice_head is None
    idx = {k: torch.as_tensor(v) for k, v in ft.encode(train["user_id"][:5], train["item_id"][:5]).items()}
    # Neither the pair's own rating nor its watch is taken out of the user's tokens here, so the
    # user side is the same whichever movie is scored.
    idx["own_watch"], idx["self_r"] = torch.zeros(5), torch.zeros(5)
    pool = torch.arange(1, 9)
    text = torch.as_tensor(np.r_[0, ft.encode(np.zeros(len(ft.item_ids)), ft.item_ids)["text"]])
    with torch.no_grad():
        choice = model(**idx, head="choice")
        logits, pick, pool_logits = model(**idx, head="both", pool_item=pool, pool_text=text[pool])
        assert logits.shape == (5, scale.n_classes) and pick.shape == (5,) and pool_logits.shape == (5, 8)
        torch.testing.assert_close(choice, pick)
        torch.testing.assert_close(model(**idx), logits)  # the rating head reads the same encoding
        # The same user scoring another movie through forward == its pool column: the user vector
        # does not depend on the movie scored (only on the user's tokens and session).
        other = {**idx, "item": pool[:5], "text": text[pool[:5]]}
        torch.testing.assert_close(model(**other, head="choice"), pool_logits[:, :5].diagonal())
        session = model(**idx, head="choice", session_items=torch.tensor([[3, 4]] * 5),
                        session_r=torch.ones(5, 2))
    assert (session - choice).abs().max() > 1e-4


def test_dot_head_trains_and_joint_checkpoints_still_load(tables, tmp_path):
    from rlsim.reward.predict import RewardPredictor

    ft, train, scale = tables
    for scorer in ("dot", "joint"):
        # The "joint" one as saved before the head read popularity (the test deletes both keys below).
        cfg = RewardConfig(**{**CFG, "choice_scorer": scorer, "choice_popularity": scorer == "dot"})
        torch.manual_seed(0)
        model = VanillaTransformer(cfg, ft, scale.values).train()
        tr = tensors(ft, train, scale, "cpu", choice=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        gen = torch.Generator().manual_seed(0)
        b = torch.arange(32)
        first = train_step(model, opt, sched, tr, b, cfg, gen)
        for _ in range(20):
            last = train_step(model, opt, sched, tr, b, cfg, gen)
        assert last < first
        RewardPredictor([model], ft, scale, cfg).save(tmp_path / scorer)
    meta = json.loads((tmp_path / "joint" / "config.json").read_text())
    del meta["reward"]["choice_scorer"], meta["reward"]["choice_popularity"]  # saved before either existed
    (tmp_path / "joint" / "config.json").write_text(json.dumps(meta))
    old = RewardPredictor.load(tmp_path / "joint")
    assert old.has_choice and old.models[0].choice_head is not None
    assert RewardPredictor.load(tmp_path / "dot").models[0].choice_user is not None
    p = old.choice_proba(train["user_id"][:4], train["item_id"][:4])
    assert ((p > 0) & (p < 1)).all()
    with pytest.raises(ConfigError):
        RewardConfig(choice_weight=1.0, choice_scorer="mlp").validate()
