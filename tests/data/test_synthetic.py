"""Synthetic MovieLens-shaped data: statistics close to the source, seeded, loadable like the real sets.

Every statistical check uses fixed seeds and tolerances several times the spread seen over seeds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rlsim.config import DataConfig
from rlsim.data import load_movielens, load_split, make_split
from rlsim.data.schema import Dataset, RatingScale
from rlsim.data.synthetic import PRESETS, SynthConfig, generate, parse_size, preset_config, read_meta, read_synthetic
from rlsim.data.synthetic_model import popularity_exponent, source_stats
from rlsim.errors import DataError


def zipf_source(n_users=400, n_items=300, per_user=(20, 120), exponent=1.0, seed=0) -> Dataset:
    """A source with a known popularity power law and per-user rating styles (no real data)."""
    rng = np.random.default_rng(seed)
    w = np.arange(1, n_items + 1, dtype=float) ** -exponent
    w /= w.sum()
    rows = []
    for u in range(n_users):
        n = int(np.exp(rng.uniform(np.log(per_user[0]), np.log(per_user[1]))))
        items = rng.choice(n_items, size=n, replace=False, p=w)
        mean, sd = rng.normal(3.6, 0.4), rng.uniform(0.6, 1.2)
        r = np.clip(np.round(mean + sd * rng.standard_normal(n)), 1, 5)
        t0 = int(rng.integers(880_000_000, 890_000_000))
        for i, x in zip(items, r):
            rows.append((u + 1, i + 1, float(x), t0 + int(rng.integers(0, 3_000_000))))
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "title": [f"Film {j} ({1990 + j % 20})" for j in range(n_items)],
                          "year": pd.array([1990 + j % 20 for j in range(n_items)], dtype="Int64"),
                          "genres": [["Action", "Comedy", "Drama|Romance", "Horror|Thriller"][j % 4] for j in range(n_items)],
                          "overview": [f"A story number {j}." for j in range(n_items)]})
    users = pd.DataFrame({"user_id": np.arange(1, n_users + 1), "age": pd.array([20 + u % 40 for u in range(n_users)], dtype="Int64"),
                          "gender": ["MF"[u % 2] for u in range(n_users)], "occupation": ["student"] * n_users})
    return Dataset("zipf", ratings, items, users, RatingScale(1.0, 5.0, 1.0), {})


@pytest.fixture(scope="module")
def zipf():
    return zipf_source()


@pytest.fixture(scope="module")
def generated(zipf, tmp_path_factory):
    """4x the source's ratings on the same users x items shape."""
    n = len(zipf.ratings)
    out = tmp_path_factory.mktemp("syn") / "synthetic-test"
    generate(zipf, SynthConfig(n_ratings=4 * n, n_users=4 * 400, n_items=300, source="zipf", seed=3,
                               chunk_users=500), out)
    return read_synthetic(out)


def _hist(r, scale):
    return np.bincount(scale.to_class(r), minlength=scale.n_classes) / len(r)


def test_schema_counts_and_scale(generated, zipf):
    ds = generated
    assert list(ds.ratings.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert [str(t) for t in ds.ratings.dtypes] == ["int64", "int64", "float64", "int64"]
    assert len(ds.ratings) == 4 * len(zipf.ratings)  # exactly the requested size
    assert ds.ratings.user_id.between(1, 1600).all() and ds.ratings.item_id.between(1, 300).all()
    assert not ds.ratings.duplicated(["user_id", "item_id"]).any()
    assert set(ds.ratings.rating.unique()) <= set(zipf.scale.values)
    assert ds.ratings.timestamp.between(zipf.ratings.timestamp.min(), zipf.ratings.timestamp.max()).all()
    assert ds.ratings.groupby("user_id").size().min() >= zipf.ratings.groupby("user_id").size().min()
    assert list(ds.items.columns) == ["item_id", "title", "year", "genres", "overview"]
    assert list(ds.users.columns) == ["user_id", "age", "gender", "occupation"]
    assert ds.users.gender.isin(["M", "F"]).all()  # demographics resampled from the source


def test_statistics_follow_the_source(generated, zipf):
    src, syn = zipf.ratings, generated.ratings
    # Rating histogram (thresholds are calibrated to it): total variation distance.
    tv = 0.5 * np.abs(_hist(src.rating, zipf.scale) - _hist(syn.rating, zipf.scale)).sum()
    assert tv < 0.02
    # Popularity power law (rank-frequency exponent).
    e_src = popularity_exponent(src.groupby("item_id").size())
    e_syn = popularity_exponent(syn.groupby("item_id").size())
    assert abs(e_src - e_syn) < 0.1, (e_src, e_syn)
    # Per-user mean and sd: the quartiles of their distributions.
    for stat in ("mean", "std"):
        a = src.groupby("user_id").rating.agg(stat).quantile([0.25, 0.5, 0.75]).to_numpy()
        b = syn.groupby("user_id").rating.agg(stat).quantile([0.25, 0.5, 0.75]).to_numpy()
        assert np.abs(a - b).max() < 0.12, (stat, a, b)
    # Ratings per user: the same shape, scaled (here x1 per user).
    a = src.groupby("user_id").size().quantile([0.1, 0.5, 0.9]).to_numpy()
    b = syn.groupby("user_id").size().quantile([0.1, 0.5, 0.9]).to_numpy()
    assert np.all(np.abs(np.log(b / a)) < 0.25), (a, b)


def test_latent_structure_is_learnable(generated):
    from rlsim.baselines import evaluate_baselines

    s = make_split(generated, "random", seed=0)
    res = evaluate_baselines(s.train, s.test, generated.scale)
    # Item quality and user x item taste exist: bias beats the user mean, MF beats bias.
    assert res["bias"]["rmse"] < res["user_mean"]["rmse"] - 0.03
    assert res["mf"]["rmse"] < res["bias"]["rmse"] - 0.005


def test_deterministic_per_seed(zipf, tmp_path):
    cfg = SynthConfig(n_ratings=6000, n_users=200, n_items=150, source="zipf", seed=1, chunk_users=64)
    a = read_synthetic(generate(zipf, cfg, tmp_path / "a"))
    b = read_synthetic(generate(zipf, cfg, tmp_path / "b"))
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.users, b.users)
    c = read_synthetic(generate(zipf, SynthConfig(**{**cfg.__dict__, "seed": 2}), tmp_path / "c"))
    assert not a.ratings.equals(c.ratings)
    assert read_meta(tmp_path / "a")["synthetic"] is True


def test_item_text_reuses_source_movies(zipf, tmp_path):
    ds = read_synthetic(generate(zipf, SynthConfig(n_ratings=20000, n_users=400, n_items=900, source="zipf"),
                                 tmp_path / "s"))
    assert len(ds.items) == 900 and ds.items.title.is_unique
    # 3 synthetic movies per source movie: copies are marked "#2", "#3", and keep genres, year, overview.
    assert ds.items.title.str.contains(r" #[23] \(\d{4}\)$").sum() == 600
    assert set(ds.items.overview) <= set(zipf.items.overview)
    assert set(ds.items.genres) <= set(zipf.items.genres)


def test_loads_through_the_data_layer(zipf, tmp_path):
    generate(zipf, SynthConfig(n_ratings=8000, n_users=200, n_items=150, source="zipf"), tmp_path / "synthetic-small")
    cfg = DataConfig(dataset="synthetic-small", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"),
                     split="temporal", download=False)
    ds, split = load_split(cfg)
    assert ds.name == "synthetic-small" and len(split.train) + len(split.test) == 8000
    # Temporal: each user's test ratings are their latest.
    last_train = split.train.groupby("user_id").timestamp.max()
    first_test = split.test.groupby("user_id").timestamp.min()
    assert (first_test >= last_train.reindex(first_test.index)).all()
    cfg.split = "random"
    _, split = load_split(cfg)
    assert abs(len(split.test) / 8000 - 0.2) < 0.02
    with pytest.raises(DataError, match="no synthetic dataset 'synthetic-nope'"):
        load_movielens("synthetic-nope", data_dir=tmp_path, cache_dir=tmp_path / "c")


def test_presets_generate_once_into_the_cache(data_root, tmp_path):
    name = "synthetic-100k-from-ml-100k"
    a = load_movielens(name, data_dir=data_root, cache_dir=tmp_path, download=False)
    assert (len(a.ratings), a.ratings.user_id.nunique(), len(a.items)) == PRESETS["100k"]
    assert a.scale.step == 1.0 and a.items.title.is_unique
    folders = list((tmp_path / "synthetic").iterdir())
    assert len(folders) == 1
    mtime = (folders[0] / "ratings.parquet").stat().st_mtime_ns
    b = load_movielens(name, data_dir=data_root, cache_dir=tmp_path, download=False)
    assert (folders[0] / "ratings.parquet").stat().st_mtime_ns == mtime  # read, not regenerated
    pd.testing.assert_frame_equal(a.ratings, b.ratings)


def test_cli_synth(data_root, tmp_path, capsys):
    from rlsim.cli import main

    out = tmp_path / "data" / "synthetic-20k"
    rc = main(["data", "synth", "--ratings", "20k", "--users", "200", "--items", "300", "--source", "ml-100k",
               "--data-dir", str(data_root), "--cache-dir", str(tmp_path / "c"), "--no-download", "--out", str(out)])
    assert rc == 0
    assert "--dataset synthetic-20k" in capsys.readouterr().out
    ds = load_movielens("synthetic-20k", data_dir=tmp_path / "data", cache_dir=tmp_path / "c")
    assert len(ds.ratings) == 20_000


def test_sizes_and_presets():
    assert parse_size("100k") == 100_000 and parse_size("2.5m") == 2_500_000 and parse_size("1234") == 1234
    with pytest.raises(DataError):
        parse_size("ten")
    cfg = preset_config("synthetic-10m")
    assert (cfg.n_ratings, cfg.n_users, cfg.n_items, cfg.source) == (10_000_000, 69_878, 10_677, "ml-latest-small")
    assert preset_config("synthetic-1m-from-ml-100k").source == "ml-100k"
    assert preset_config("synthetic-3m") is None
    with pytest.raises(DataError, match="do not fit"):
        SynthConfig(n_ratings=10_000, n_users=10, n_items=100).validate()


@pytest.mark.realdata
def test_real_source_statistics(real_data_dir, tmp_path):
    src = load_movielens("ml-100k", data_dir=real_data_dir, cache_dir=tmp_path / "c", download=False)
    st = source_stats(src)
    ds = read_synthetic(generate(src, SynthConfig(n_ratings=100_000, n_users=943, n_items=1682, source="ml-100k"),
                                 tmp_path / "s"))
    tv = 0.5 * np.abs(st.hist - _hist(ds.ratings.rating, ds.scale)).sum()
    assert tv < 0.01
    assert abs(popularity_exponent(ds.ratings.groupby("item_id").size()) - st.describe()["popularity_exponent"]) < 0.15
    for stat in ("mean", "std"):
        a = src.ratings.groupby("user_id").rating.agg(stat).quantile([0.1, 0.5, 0.9]).to_numpy()
        b = ds.ratings.groupby("user_id").rating.agg(stat).quantile([0.1, 0.5, 0.9]).to_numpy()
        assert np.abs(a - b).max() < 0.1, (stat, a, b)
