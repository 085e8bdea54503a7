"""The v-tf reward model on the generated fixtures (fast) and on real ML-100K u1 (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlsim.config import DataConfig
from rlsim.errors import ConfigError
from rlsim.io import read_json
from rlsim.reward.config import RewardConfig
from tests.conftest import WARM_CACHE_DIR

SMALL = dict(dim=32, heads=2, ff_dim=64, text_hidden=64, layers=1, batch_size=64, epochs=12, patience=12,
             lr=3e-3, val_frac=0.1, seed=0, dropout=0.1, emb_weight_decay=0.05, decay_epochs=0)


@pytest.fixture(scope="module")
def data_cfg(data_root, cache_root):
    return DataConfig(dataset="ml-100k", data_dir=str(data_root), cache_dir=str(cache_root), split="u1",
                      download=False)


@pytest.fixture(scope="module")
def trained(data_cfg, tmp_path_factory):
    from rlsim.reward.train import train_reward_model

    out = tmp_path_factory.mktemp("reward")
    reports = []
    result = train_reward_model(data_cfg, RewardConfig(**SMALL), out, report_fn=reports.append)
    return out, result, reports


def test_training_loss_falls_and_beats_global_mean(trained):
    out, result, reports = trained
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0]
    m, b = result["model"], result["baselines"]
    assert m["rmse"] < b["global_mean"]["rmse"]
    assert m["rmse"] < b["user_mean"]["rmse"]
    for key in ("rmse", "mae", "accuracy", "ndcg@10", "ndcg_floor@10", "exact", "off_by_1", "within_1"):
        assert np.isfinite(m[key])
    # report_fn got one row per epoch with the keys the Tune sweep reads
    assert len(reports) == len(result["history"])
    assert {"epoch", "val_rmse", "val_accuracy", "val_loss", "train_loss"} <= set(reports[0])


def test_outputs_written(trained):
    out, result, _ = trained
    import pandas as pd

    saved = read_json(out / "metrics.json")
    assert saved["model"]["rmse"] == pytest.approx(result["model"]["rmse"])
    assert set(saved["per_user"]) == {"train", "validation", "test"}
    assert "spearman_gini_accuracy" in saved["per_user"]["test"]
    pu = pd.read_parquet(out / "per_user.parquet")
    assert {"user_id", "split", "accuracy", "ndcg@10", "ndcg@100", "gini"} <= set(pu.columns)
    assert set(pu["split"]) == {"train", "validation", "test"}
    for png in ("accuracy_boxplot.png", "ndcg_boxplot.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_round_trip(trained, data_cfg):
    from rlsim.data import load_split
    from rlsim.reward.evaluate import evaluate_predictor
    from rlsim.reward.predict import RewardPredictor

    out, result, _ = trained
    pred = RewardPredictor.load(out / "checkpoint")
    _, split = load_split(data_cfg)
    metrics, _ = evaluate_predictor(pred, split.train, split.test, baselines=False)
    for key in ("rmse", "mae", "accuracy", "ndcg@10", "exact"):
        assert metrics["model"][key] == pytest.approx(result["model"][key], abs=1e-6)


def test_unknown_users_and_items(trained):
    from rlsim.reward.predict import RewardPredictor

    pred = RewardPredictor.load(trained[0])  # a run folder works too
    u = np.array([pred.known_users[0], 10_000_001, 10_000_002, pred.known_users[1]])
    i = np.array([10_000_003, pred.known_items[0], 10_000_004, pred.known_items[1]])
    proba = pred.predict_proba(u, i)
    assert proba.shape == (4, pred.scale.n_classes)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    r = pred.predict(u, i)
    assert np.all((r >= pred.scale.min) & (r <= pred.scale.max))
    # batched prediction equals one-by-one prediction
    one = np.array([pred.predict(u[k:k + 1], i[k:k + 1])[0] for k in range(4)])
    np.testing.assert_allclose(one, r, atol=1e-5)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    from rlsim.errors import RlsimError
    from rlsim.reward.predict import RewardPredictor

    with pytest.raises(RlsimError):
        RewardPredictor.load(tmp_path)


def test_config_section_and_flags(tmp_path, data_root, cache_root):
    from rlsim.cli import build_parser, run_config
    from rlsim.commands.reward import reward_config

    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("data:\n  dataset: ml-100k\nreward:\n  dim: 48\n  heads: 4\n  epochs: 7\n")
    args = build_parser().parse_args(["reward", "train", "--config", str(cfg_file), "--epochs", "3",
                                      "--out", str(tmp_path / "o")])
    cfg = reward_config(run_config(args))
    assert (cfg.dim, cfg.epochs) == (48, 3)
    with pytest.raises(ConfigError):
        RewardConfig.from_dict({"dimm": 3})
    with pytest.raises(ConfigError):
        RewardConfig.from_dict({"dim": 30, "heads": 4})


def test_cli_train_and_evaluate(data_root, cache_root, tmp_path, capsys):
    from rlsim.cli import main

    common = ["--dataset", "ml-100k", "--split", "u2", "--data-dir", str(data_root), "--cache-dir", str(cache_root),
              "--no-download"]
    out = tmp_path / "run"
    assert main(["reward", "train", *common, "--out", str(out), "--epochs", "2", "--dim", "32",
                 "--batch-size", "128"]) == 0
    m = read_json(out / "metrics.json")
    assert {"rmse", "mae", "accuracy", "ndcg@10"} <= set(m["model"])
    assert {"global_mean", "user_mean", "rounded_user_mean", "bias", "mf"} <= set(m["baselines"])
    assert {"rmse", "ndcg@10"} <= set(m["baselines"]["mf"])
    assert len(m["history"]) == 2
    ev = tmp_path / "eval"
    assert main(["reward", "evaluate", *common, "--checkpoint", str(out / "checkpoint"), "--out", str(ev)]) == 0
    e = read_json(ev / "metrics.json")
    assert e["model"]["rmse"] == pytest.approx(m["model"]["rmse"], abs=1e-6)
    assert e["baselines"]["bias"]["rmse"] == pytest.approx(m["baselines"]["bias"]["rmse"])
    # a checkpoint from another scale is refused with one line, not a traceback
    rc = main(["reward", "evaluate", "--dataset", "ml-latest-small", "--split", "random", "--data-dir",
               str(data_root), "--cache-dir", str(cache_root), "--no-download", "--checkpoint", str(out),
               "--out", str(tmp_path / "bad")])
    assert rc == 2
    assert "rlsim: error:" in capsys.readouterr().err
    assert main(["reward", "evaluate", *common, "--checkpoint", str(tmp_path / "nope"), "--out", str(ev)]) == 2


def test_half_star_scale_uses_ten_classes(data_root, cache_root):
    from rlsim.reward.train import train_reward_model

    dcfg = DataConfig(dataset="ml-latest-small", data_dir=str(data_root), cache_dir=str(cache_root),
                      split="random", download=False)
    res = train_reward_model(dcfg, RewardConfig(**{**SMALL, "epochs": 2}), None)
    assert res["model"]["rmse"] < res["baselines"]["global_mean"]["rmse"] * 1.2
    from rlsim.data import load_split

    ds, _ = load_split(dcfg)
    assert ds.scale.n_classes == 10


@pytest.mark.slow
def test_real_ml100k_u1_beats_user_mean(real_data_dir, tmp_path):
    from rlsim.reward.train import train_reward_model

    cache = WARM_CACHE_DIR or str(tmp_path / "cache")  # a warm cache skips MiniLM encoding
    dcfg = DataConfig(dataset="ml-100k", data_dir=str(real_data_dir), cache_dir=cache, split="u1", download=False)
    res = train_reward_model(dcfg, RewardConfig(epochs=2), tmp_path / "run")
    assert res["model"]["rmse"] < res["baselines"]["user_mean"]["rmse"]
    assert res["model"]["rmse"] < 1.0
    assert json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["n_classes"] == 5


def test_rating_history_never_sees_the_pairs_own_rating():
    """With the rated-history tokens, a training pair's prediction must not depend on its own rating."""
    import torch

    from rlsim.data.schema import RatingScale
    from rlsim.reward.features import build_features
    from rlsim.reward.model import VanillaTransformer

    from tests.reward.tiny import tiny_ratings

    train, items, users, text = tiny_ratings(300, 30)
    cfg = RewardConfig(dim=16, heads=2, ff_dim=32, text_hidden=16, history_ratings=True, dropout=0.0)
    scale = RatingScale(1, 5, 1)
    row = train.index[0]
    outs, leaky = [], []
    for new_rating in (1.0, 5.0):
        t = train.copy()
        t.loc[row, "rating"] = new_rating
        # Keep the global mean fixed so only the pair's own rating changes.
        r0 = train.loc[row]
        other = train.index[(train.user_id != r0.user_id) & (train.item_id != r0.item_id)][0]
        t.loc[other, "rating"] = train.loc[other, "rating"] + train.loc[row, "rating"] - new_rating
        ft = build_features(items, users, t, text)
        torch.manual_seed(0)
        model = VanillaTransformer(cfg, ft, scale.values).eval()
        idx = ft.encode(t["user_id"].to_numpy()[:1], t["item_id"].to_numpy()[:1])
        with torch.no_grad():
            outs.append(model(**{k: torch.as_tensor(v) for k, v in idx.items()}).numpy())
            idx.pop("self_r")  # without leaving it out, the rating would show through
            leaky.append(model(**{k: torch.as_tensor(v) for k, v in idx.items()}).numpy())
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    assert np.abs(leaky[0] - leaky[1]).max() > 1e-3


def test_training_history_rows_equal_the_full_sparse_product(data_cfg):
    """Training computes the batch's history rows only; values and gradients equal the full product."""
    import torch

    from rlsim.data import load_split
    from rlsim.embeddings import TextEncoder, item_embeddings
    from rlsim.reward.features import build_features
    from rlsim.reward.model import VanillaTransformer, _SparseRows

    ds, split = load_split(data_cfg)
    ft = build_features(ds.items, ds.users, split.train, item_embeddings(ds.items, TextEncoder(
        data_cfg.text_model, data_cfg.cache_dir)))
    m = VanillaTransformer(RewardConfig(**SMALL), ft, ds.scale.values)
    rows = torch.tensor([0, 3, 1, 3, len(ft.user_ids)])  # repeated and unknown (0) rows too
    for matrix, table in ((m.hist, m.hist_emb), (m.hist_r, m.hist_r_emb)):
        full = torch.sparse.mm(matrix, table.weight)[rows]
        part = _SparseRows(matrix.coalesce().to_sparse_csr(), table)[rows]
        torch.testing.assert_close(part, full)
        g_full = torch.autograd.grad(full.pow(2).sum(), table.weight)[0]
        g_part = torch.autograd.grad(part.pow(2).sum(), table.weight)[0]
        torch.testing.assert_close(g_part.to_dense() if g_part.is_sparse else g_part, g_full)
    m.train()
    assert isinstance(m._sparse_product("hist", m.hist, m.hist_emb), _SparseRows)
    # The CSR copies are built once (training_cache), kept across eval()/train(), rebuilt when a matrix changes.
    m.training_cache(keep=True)
    csr = m._training_csr("hist", m.hist)
    m.eval()
    m.train()
    assert m._training_csr("hist", m.hist) is csr
    assert m._csr_memo["hist"] is m._csr_memo["hist_r"]  # one pattern, one draw of positions
    assert m._csr_memo["hist"] is not m._csr_memo["item_hist_r"]
    m.hist._values().mul_(2.0)
    assert m._training_csr("hist", m.hist) is not csr
    m.training_cache(keep=False)
    assert not m._csr
    m.eval()
    assert m._sparse_product("hist", m.hist, m.hist_emb).shape == (m.hist.shape[0], m.hist_emb.weight.shape[1])


def test_sampled_history_rows_are_an_unbiased_bounded_estimate():
    """reward.history_sample: a row longer than the sample is `sample` draws reweighted; averaged over
    draws it is the full row; a sample as long as every row is the full product itself."""
    import torch
    from torch import nn

    from rlsim.reward.model import _SparseRows

    gen = np.random.default_rng(0)
    n_rows, n_cols = 6, 40
    lengths = [0, 1, 3, 12, 40, 25]
    r = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    c = np.concatenate([gen.choice(n_cols, n, replace=False) for n in lengths])
    matrix = torch.sparse_coo_tensor(torch.as_tensor(np.stack([r, c])), torch.as_tensor(gen.normal(size=len(r)),
                                                                                    dtype=torch.float32),
                                     (n_rows, n_cols)).coalesce()
    table = nn.Embedding(n_cols, 4)
    rows = torch.tensor([5, 0, 3, 4, 1, 4, 2])
    full = torch.sparse.mm(matrix, table.weight)[rows].detach()
    csr = matrix.to_sparse_csr()
    torch.testing.assert_close(_SparseRows(csr, table, sample=40)[rows].detach(), full)
    torch.manual_seed(0)
    sampled = _SparseRows(csr, table, sample=5)
    draws = torch.stack([sampled[rows.clone()].detach() for _ in range(4000)])
    short = torch.tensor([lengths[i] <= 5 for i in rows.tolist()])
    torch.testing.assert_close(draws[:, short], full[short].expand(len(draws), -1, -1))  # short rows: exact
    assert (draws[:, ~short].std(0) > 0).all()  # long rows: noisy ...
    se = draws.std(0) / len(draws) ** 0.5  # ... and unbiased: the mean of the draws within 5 standard errors
    assert ((draws.mean(0) - full).abs() <= 5 * se + 1e-6).all()
    idx, offsets, weight, inverse = sampled.positions(rows.clone())
    assert len(idx) == sum(min(lengths[i], 5) for i in rows.unique().tolist())  # unique rows, bounded
    assert torch.equal(rows.unique()[inverse], rows)


def test_inference_cache_survives_calls_and_follows_weight_changes(trained, monkeypatch):
    """predict_proba twice: the history products and the text MLP run once, not per call; a weight
    change (distillation) recomputes them, and the answers equal a freshly loaded model's."""
    import torch

    from rlsim.reward import model as model_mod
    from rlsim.reward.predict import RewardPredictor, fine_tune

    pred = RewardPredictor.load(trained[0])
    m = pred.models[0]
    calls = {"mm": 0, "text": 0}
    real_mm = torch.sparse.mm

    def counting_mm(*a, **k):
        calls["mm"] += 1
        return real_mm(*a, **k)

    monkeypatch.setattr(model_mod.torch.sparse, "mm", counting_mm)
    m.text_mlp.register_forward_hook(  # inference projections only (training runs it per batch)
        lambda mod, *_: None if mod.training else calls.__setitem__("text", calls["text"] + 1))
    u = np.repeat(pred.known_users[:4], 2)
    i = np.tile(pred.known_items[:2], 4)
    first = pred.predict_proba(u, i)
    per_call = dict(calls)
    n_products = int(m.cfg.history) + 2 * int(m.cfg.history_ratings)
    assert per_call == {"mm": n_products, "text": 1}
    np.testing.assert_array_equal(pred.predict_proba(u, i), first)
    assert calls == per_call  # the second call reused every cached row

    fine_tune(pred, u, i, np.eye(pred.scale.n_classes)[np.zeros(len(u), int)], epochs=2)
    after = pred.predict_proba(u, i)
    # Distillation moves the dense layers only: the text projection is recomputed, the history
    # products (over the untouched ID tables) are not.
    assert calls == {"mm": n_products, "text": 2}
    assert np.abs(after - first).max() > 1e-4
    g = torch.Generator().manual_seed(0)
    state = {k: (v + 0.2 * torch.randn(v.shape, generator=g) if k.endswith("_emb.weight") else v)
             for k, v in m.state_dict().items()}
    m.load_state_dict(state, strict=False)  # every table changes in place
    moved = pred.predict_proba(u, i)
    assert calls == {"mm": 2 * n_products, "text": 3}
    assert np.abs(moved - after).max() > 1e-4
    after = moved
    # The recomputed cache gives what a model built from these weights gives.
    fresh = RewardPredictor.load(trained[0])
    fresh.models[0].load_state_dict(m.state_dict())
    np.testing.assert_allclose(fresh.predict_proba(u, i), after, atol=1e-6)


def _clustered_ml100k(data_root, dst):
    """The ml-100k fixture with u1 rewritten so that picks follow taste: users in 4 groups watch
    mostly their group's movies (and a popular head), in train and test alike."""
    import shutil

    shutil.copytree(data_root, dst, dirs_exist_ok=True)
    rng = np.random.default_rng(0)
    groups = np.array_split(np.arange(1, 81), 4)
    pop = 1 / np.arange(1, 81) ** 0.7
    rows = []
    for u in range(1, 61):
        w = np.where(np.isin(np.arange(1, 81), groups[u % 4]), 8.0, 1.0) * pop
        for t, i in enumerate(rng.choice(np.arange(1, 81), 24, replace=False, p=w / w.sum())):
            # Ratings follow taste too (so the rating validation keeps improving while the head learns).
            r = int(np.clip((5 if i in groups[u % 4] else 2) + rng.integers(-1, 2), 1, 5))
            rows.append(f"{u}\t{i}\t{r}\t{880000000 + t}")
    test = set(range(4, len(rows), 5))
    (dst / "ml-100k" / "u1.base").write_text("\n".join(r for k, r in enumerate(rows) if k not in test) + "\n")
    (dst / "ml-100k" / "u1.test").write_text("\n".join(rows[k] for k in sorted(test)) + "\n")
    return dst


def test_choice_head_learns_what_users_pick_and_survives_the_checkpoint(data_root, cache_root, tmp_path):
    """reward.choice_weight > 0: the same transformer also says whether the user would pick the movie
    (trained on rated vs sampled unrated movies); the simulator then chooses and ranks held-out picks
    above unrated movies far better than chance; a model without the head only rates."""
    from rlsim.data import load_split
    from rlsim.reward.predict import RewardPredictor
    from rlsim.reward.train import train_reward_model
    from rlsim.simulators.base import NoChoiceModel, Session
    from rlsim.simulators.choice_fidelity import choice_fidelity
    from rlsim.simulators.reward_model import RewardModelSimulator

    dcfg = DataConfig(dataset="ml-100k", data_dir=str(_clustered_ml100k(data_root, tmp_path / "data")),
                      cache_dir=str(cache_root), split="u1", download=False)
    res = train_reward_model(dcfg, RewardConfig(**{**SMALL, "epochs": 8, "choice_weight": 1.0}), tmp_path / "c")
    assert np.isfinite(res["model"]["rmse"])
    pred = RewardPredictor.load(tmp_path / "c" / "checkpoint")
    sim = RewardModelSimulator(pred)
    assert pred.has_choice and sim.has_choice and sim.describe()["choice"] == "head"
    _, split = load_split(dcfg)
    u, i = split.test.user_id.to_numpy()[:50], split.test.item_id.to_numpy()[:50]
    p = sim.choice(u, i)
    assert ((p > 0) & (p < 1)).all()
    np.testing.assert_allclose(sim.outcome(u, i).sum(1), 1.0, atol=1e-5)
    assert (sim.choice(u, i, [Session((int(x),), (4.0,)) for x in i]) == 0).all()
    head = choice_fidelity(sim.choice, split.train, split.test)["summary"]
    assert head["auc"] > 0.7 and head["acc_1to3"] > 0.4  # chance: 0.5 and 0.25
    plain = train_reward_model(dcfg, RewardConfig(**{**SMALL, "epochs": 1}), tmp_path / "p")
    only_rates = RewardModelSimulator(RewardPredictor.load(tmp_path / "p" / "checkpoint"))
    assert plain and not only_rates.has_choice
    with pytest.raises(NoChoiceModel):
        only_rates.choice(u, i)
