"""Baselines on fixtures and, when present, the known ML-100K u1 values."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from rlsim.baselines import BiasBaseline, GlobalMean, MatrixFactorization, RoundedUserMean, UserMean, evaluate_baselines
from rlsim.data import load_movielens, make_split
from rlsim.data.schema import RatingScale

S5 = RatingScale(1, 5, 1)


def _toy():
    return pd.DataFrame({"user_id": [1, 1, 2, 2, 3], "item_id": [10, 11, 10, 12, 11], "rating": [5.0, 3, 4, 2, 1],
                         "timestamp": 0})


def test_means_by_hand():
    tr = _toy()
    assert GlobalMean().fit(tr, S5).predict([9], [9])[0] == pytest.approx(3.0)
    um = UserMean().fit(tr, S5)
    assert list(um.predict([1, 2, 3, 99], [0, 0, 0, 0])) == [4.0, 3.0, 1.0, 3.0]
    rum = RoundedUserMean().fit(tr.assign(rating=[5.0, 4, 4, 2, 1]), S5)
    assert rum.predict([1], [0])[0] == 5.0  # 4.5 rounds half up on the scale


def test_bias_without_damping_matches_closed_form():
    tr = _toy()
    b = BiasBaseline(reg_user=0, reg_item=0, n_iter=1).fit(tr, S5)
    mu = 3.0
    bi10 = ((5 - mu) + (4 - mu)) / 2
    assert b.item_bias([10])[0] == pytest.approx(bi10)
    assert b.user_bias([1])[0] == pytest.approx(((5 - mu - bi10) + (3 - mu - b.item_bias([11])[0])) / 2)


def test_models_learn_fixture_structure(ml100k):
    s = make_split(ml100k, "u1")
    res = evaluate_baselines(s.train, s.test, ml100k.scale)
    assert set(res) == {"global_mean", "user_mean", "rounded_user_mean", "bias", "mf"}
    assert res["bias"]["rmse"] < res["user_mean"]["rmse"] < res["global_mean"]["rmse"]
    for m in res.values():
        assert 0 <= m["exact"] <= m["within_1"] <= 1
        assert m["within_1"] == pytest.approx(m["exact"] + m["off_by_1"])
        assert 0 < m["ndcg_floor@10"] <= m["ndcg@10"] + 0.05


def test_mf_fits_low_rank_data():
    rng = np.random.default_rng(0)
    U, V = rng.normal(size=(50, 2)), rng.normal(size=(40, 2))
    rows = [(u, i, float(np.clip(3 + U[u] @ V[i], 1, 5))) for u in range(50) for i in range(40) if rng.random() < 0.6]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating"]).assign(timestamp=0)
    df = df.sample(frac=1.0, random_state=0)
    tr, te = df.iloc[: int(0.8 * len(df))], df.iloc[int(0.8 * len(df)):]
    mf = MatrixFactorization(factors=4, reg=0.02, n_iter=20).fit(tr, S5)
    bias = BiasBaseline().fit(tr, S5)
    e_mf = np.sqrt(np.mean((mf.predict(te.user_id, te.item_id) - te.rating) ** 2))
    e_b = np.sqrt(np.mean((bias.predict(te.user_id, te.item_id) - te.rating) ** 2))
    assert e_mf < 0.6 * e_b


def test_cli_baselines_writes_metrics(data_root, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "rlsim.cli", "baselines", "--dataset", "ml-100k", "--split", "u2",
                        "--data-dir", str(data_root), "--cache-dir", str(tmp_path / "c"), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())["baselines"]
    assert set(m["mf"]) >= {"rmse", "mae", "exact", "off_by_1", "within_1", "ndcg@10", "ndcg_floor@10"}


def test_cli_errors_are_one_line(data_root, tmp_path):
    r = subprocess.run([sys.executable, "-m", "rlsim.cli", "baselines", "--dataset", "ml-100k", "--split", "u1",
                        "--data-dir", str(tmp_path / "nowhere"), "--no-download", "--cache-dir", str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("rlsim: error: ml-100k not found")
    r = subprocess.run([sys.executable, "-m", "rlsim.cli", "baselines", "--dataset", "ml-7", "--data-dir",
                        str(data_root), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown dataset 'ml-7'" in r.stderr


@pytest.mark.realdata
def test_known_ml100k_u1_values(real_data_dir, tmp_path):
    ds = load_movielens("ml-100k", data_dir=real_data_dir, cache_dir=tmp_path, download=False)
    s = make_split(ds, "u1")
    assert len(s.train) == 80000 and len(s.test) == 20000
    res = evaluate_baselines(s.train, s.test, ds.scale)
    assert round(res["global_mean"]["rmse"], 3) == 1.154
    assert round(res["user_mean"]["rmse"], 3) == 1.063
    assert res["bias"]["rmse"] < 0.965
    assert res["mf"]["rmse"] < 0.94


@pytest.mark.realdata
def test_real_files_match_official_checksums(real_data_dir):
    from rlsim.data import SPECS, verify_members

    rep = verify_members(SPECS["ml-100k"], real_data_dir / "ml-100k")
    assert all(r["ok"] for r in rep.values()), rep
    ls = load_movielens("ml-latest-small", data_dir=real_data_dir, cache_dir=real_data_dir.parent / "nonexistent-cache-ro",
                        download=False, use_cache=False)
    assert len(ls.ratings) == 100836 and ls.ratings.user_id.nunique() == 610
