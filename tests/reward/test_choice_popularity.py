"""The choice head's popularity inputs (reward.choice_popularity): a pick never counts itself, the user's
activity is the same for their picks and their unrated movies, both heads read them, old checkpoints
(saved without them) still load; and reward.threads: training runs with that many torch threads and
gives the process its own setting back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlsim.data.schema import RatingScale
from rlsim.reward.config import RewardConfig
from rlsim.reward.features import build_features
from rlsim.reward.loop import fit_one, tensors, train_step, training_threads
from rlsim.reward.model import VanillaTransformer
from tests.reward.tiny import tiny_ratings

CFG = dict(dim=16, heads=2, ff_dim=32, text_hidden=16, dropout=0.0, choice_weight=1.0, choice_pool=64,
           batch_size=32, choice_popularity=True)


@pytest.fixture(scope="module")
def tables():
    train, items, users, text = tiny_ratings(400, 40)
    train = train.reset_index(drop=True)
    return build_features(items, users, train, text), train, RatingScale(1, 5, 1)


def _standard(model, raw_item: torch.Tensor, raw_user: torch.Tensor) -> torch.Tensor:
    mean, std = model.pop_stats
    return torch.stack([(torch.log1p(raw_item) - mean[0]) / std[0], (torch.log1p(raw_user) - mean[1]) / std[1]], -1)


@pytest.mark.parametrize("scorer", ["joint", "dot"])
def test_a_pick_never_counts_itself(tables, scorer):
    ft, train, scale = tables
    model = VanillaTransformer(RewardConfig(**CFG, choice_scorer=scorer), ft, scale.values).eval()
    tr = tensors(ft, train, scale, "cpu", choice=True)
    u, i = tr["user"][:16], tr["item"][:16]
    assert tr["own_watch"][:16].eq(1).all()  # training pairs: every one a pick
    items = np.bincount(ft.hist_items, minlength=ft.n_items)
    users = np.bincount(ft.hist_users, minlength=ft.n_users)
    picks = torch.as_tensor(items[i.numpy()] - 1, dtype=torch.float32)  # the OTHER users' picks
    activity = torch.as_tensor(users[u.numpy()], dtype=torch.float32)
    torch.testing.assert_close(model.choice_features(u, i, tr["own_watch"][:16]), _standard(model, picks, activity))
    # An unrated movie keeps its whole count; the user's activity is the same whether they rated it or not.
    torch.testing.assert_close(model.choice_features(u, i), _standard(model, picks + 1, activity))
    # The unknown rows (id 0) have no picks and no activity.
    zero = torch.zeros(1, dtype=torch.long)
    torch.testing.assert_close(model.choice_features(zero, zero), _standard(model, torch.zeros(1), torch.zeros(1)))


def test_both_heads_read_popularity_and_train(tables):
    ft, train, scale = tables
    tr = tensors(ft, train, scale, "cpu", choice=True)
    b = torch.arange(32)
    for scorer in ("joint", "dot"):
        for on in (True, False):
            cfg = RewardConfig(**{**CFG, "choice_scorer": scorer, "choice_popularity": on})
            torch.manual_seed(0)
            model = VanillaTransformer(cfg, ft, scale.values)
            if scorer == "joint":
                n_in = model.choice_head[0].in_features
                assert n_in == model.n_tokens * cfg.dim + (2 if on else 0)
            else:
                assert hasattr(model, "choice_pop") == on
            if not on:
                continue
            idx = {k: torch.as_tensor(v) for k, v in ft.encode(train["user_id"][:8], train["item_id"][:8]).items()}
            model.eval()
            with torch.no_grad():
                before = model(**idx, head="choice")
                model.pop_counts[idx["item"]] += 50.0  # the same pairs, their movies far more popular
                after = model(**idx, head="choice")
                model.pop_counts[idx["item"]] -= 50.0
                torch.testing.assert_close(model(**idx), model(**idx))
            assert (after - before).abs().max() > 1e-4  # the head reads the count
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
            gen = torch.Generator().manual_seed(0)
            first = train_step(model, opt, sched, tr, b, cfg, gen)
            for _ in range(20):
                last = train_step(model, opt, sched, tr, b, cfg, gen)
            assert last < first


def test_checkpoints_saved_before_popularity_still_load(tables, tmp_path):
    from rlsim.reward.predict import RewardPredictor

    ft, train, scale = tables
    cfg = RewardConfig(**{**CFG, "choice_scorer": "joint", "choice_popularity": False})
    torch.manual_seed(0)
    RewardPredictor([VanillaTransformer(cfg, ft, scale.values)], ft, scale, cfg).save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["reward"]["choice_popularity"]  # as saved before the key existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    old = RewardPredictor.load(tmp_path / "old")
    assert old.cfg.choice_popularity is False and not old.models[0].pop_features
    p = old.choice_proba(train["user_id"][:4], train["item_id"][:4])
    assert ((p > 0) & (p < 1)).all()
    # A new checkpoint round-trips with its popularity inputs (rebuilt from the saved feature tables).
    new_cfg = RewardConfig(**CFG, choice_scorer="joint")
    torch.manual_seed(0)
    model = VanillaTransformer(new_cfg, ft, scale.values).eval()
    RewardPredictor([model], ft, scale, new_cfg).save(tmp_path / "new")
    again = RewardPredictor.load(tmp_path / "new")
    assert again.models[0].pop_features
    torch.testing.assert_close(again.models[0].pop_counts, model.pop_counts)
    np.testing.assert_allclose(again.choice_proba(train["user_id"][:4], train["item_id"][:4]),
                               RewardPredictor([model], ft, scale, new_cfg).choice_proba(train["user_id"][:4],
                                                                                       train["item_id"][:4]))


def test_training_runs_with_the_configured_threads_and_restores_them(tables):
    ft, train, scale = tables
    seen = []
    before = torch.get_num_threads()
    cfg = RewardConfig(**{**CFG, "choice_weight": 0.0}, epochs=1, decay_epochs=1, threads=2)
    assert not RewardConfig().choice_popularity  # off by default (docs/reward.md: it chose worse on validation)
    fit_one(ft, train[:300], train[300:], scale, cfg, 0, report_fn=lambda row: seen.append(torch.get_num_threads()))
    assert seen == [2] and torch.get_num_threads() == before
    assert training_threads(RewardConfig(threads=3)) == 3
    assert training_threads(RewardConfig()) >= 1  # 0: the cores this process may use
    with pytest.raises(Exception, match="threads"):
        RewardConfig(threads=-1).validate()
