"""Loader, splits and text: fixtures made by tests/fixtures.py."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlsim.data import load_movielens, make_split, read_overviews
from rlsim.data.movielens import SPECS, DatasetSpec
from rlsim.data.download import download_and_extract
from rlsim.data.text import item_texts, user_texts
from rlsim.errors import DataError
from tests.fixtures import write_ml100k, zip_folder


def _copy(data_root: Path, tmp_path: Path, name="ml-100k") -> Path:
    dst = tmp_path / "d"
    shutil.copytree(data_root / name, dst / name)
    return dst


def test_ml100k_schema_and_latin1(ml100k):
    assert list(ml100k.ratings.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert ml100k.ratings.rating.between(1, 5).all()
    titles = ml100k.items.set_index("item_id").title
    assert titles[1] == "Film 1 Amélie (1980)"  # decoded as latin-1, not mojibake
    assert ml100k.items.year.notna().all()
    assert sorted(ml100k.official_splits) == ["u1", "u2", "u3", "u4", "u5"]
    assert set(ml100k.users.columns) == {"user_id", "age", "gender", "occupation"}
    # Overviews are joined: 1 in 10 fixture films has none.
    has = ml100k.items.overview.str.len() > 0
    assert has.sum() == 72 and 'told "simply"' in ml100k.items.overview[0]


def test_latest_small_and_ml1m(data_root, cache_root):
    ls = load_movielens("ml-latest-small", data_dir=data_root, cache_dir=cache_root, download=False)
    assert ls.scale.n_classes == 10 and ls.scale.step == 0.5
    assert (ls.ratings.rating * 2 == np.round(ls.ratings.rating * 2)).all()
    assert ls.items.title.str.startswith("Film, The").all()  # quoted commas in movies.csv
    assert ls.users.age.isna().all()
    m1 = load_movielens("ml-1m", data_dir=data_root, cache_dir=cache_root, download=False)
    assert m1.users.occupation.iloc[1] == "academic/educator"
    assert m1.scale.n_classes == 5


def test_official_fold_partitions_data(ml100k):
    tests = [ml100k.official_splits[f"u{k}"][1] for k in range(1, 6)]
    allt = pd.concat(tests)
    assert len(allt) == len(ml100k.ratings)
    assert not allt.duplicated(["user_id", "item_id"]).any()
    s = make_split(ml100k, "u1")
    assert len(s.train) + len(s.test) == len(ml100k.ratings)


def test_temporal_split_is_last_per_user_and_seeded(ml100k):
    s = make_split(ml100k, "temporal", seed=3)
    for uid, g in s.test.groupby("user_id"):
        tr = s.train[s.train.user_id == uid]
        assert tr.timestamp.max() <= g.timestamp.min()
        n = len(tr) + len(g)
        assert len(g) == min(int(np.floor(n * 0.2 + 0.5)), n - 1)
    again = make_split(ml100k, "temporal", seed=3)
    pd.testing.assert_frame_equal(s.test, again.test)
    r1, r2 = make_split(ml100k, "random", seed=1), make_split(ml100k, "random", seed=2)
    assert not r1.test.equals(r2.test)


def test_unknown_split_is_clear(ml100k):
    with pytest.raises(DataError, match="unknown split 'u9'"):
        make_split(ml100k, "u9")


def test_malformed_row_names_file_and_line(data_root, tmp_path):
    d = _copy(data_root, tmp_path)
    lines = (d / "ml-100k" / "u.data").read_text().splitlines()
    lines[16] = "1\t2\t3"
    (d / "ml-100k" / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"u.data: malformed row at line 17"):
        load_movielens("ml-100k", data_dir=d, cache_dir=tmp_path / "c", download=False)
    lines[16] = "1\tx\t3\t5"
    (d / "ml-100k" / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 17: item_id is 'x'"):
        load_movielens("ml-100k", data_dir=d, cache_dir=tmp_path / "c", download=False)
    lines[16] = "1\t2\t7\t5"
    (d / "ml-100k" / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"rating 7.0 .* outside the scale"):
        load_movielens("ml-100k", data_dir=d, cache_dir=tmp_path / "c", download=False)


def test_missing_file_is_clear(data_root, tmp_path):
    d = _copy(data_root, tmp_path)
    (d / "ml-100k" / "u.user").unlink()
    with pytest.raises(DataError, match="u.user"):
        load_movielens("ml-100k", data_dir=d, cache_dir=tmp_path / "c", download=False)


def test_parquet_cache_is_reused_and_invalidated(data_root, tmp_path):
    d = _copy(data_root, tmp_path)
    cache = tmp_path / "c"
    a = load_movielens("ml-100k", data_dir=d, cache_dir=cache, download=False)
    assert len(list((cache / "datasets").glob("ml-100k-*"))) == 1
    b = load_movielens("ml-100k", data_dir=d, cache_dir=cache, download=False)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.items, b.items)
    # Changing a source file changes the cache key: the edit is seen.
    p = d / "ml-100k" / "u.data"
    p.write_text(p.read_text().replace("\n", "\n", 1) + "999\t1\t5\t880000000\n")
    c = load_movielens("ml-100k", data_dir=d, cache_dir=cache, download=False)
    assert len(c.ratings) == len(a.ratings) + 1


def test_overviews_formats(tmp_path):
    p = tmp_path / "ov.csv"
    p.write_text("movieId,title,tmdbId,imdbId,tmdb_id_used_for_overview,tmdb_id_matches_links,overview\n"
                 '1,A,1,1,1,True,"Good one"\n2,B,2,2,3,False,"Wrong film"\n3,C,3,3,3,True,\n')
    ov = read_overviews(p)
    assert ov.to_dict("records") == [{"item_id": 1, "overview": "Good one"}]


def test_texts(ml100k):
    it = item_texts(ml100k.items)
    assert it.genre_text.str.startswith("Genres: ").all()
    assert it.plot_text[0].startswith("Film 1 Amélie (1980). A story about")
    ut = user_texts(ml100k.users)
    assert ut.text[0].startswith("A ") and "-year-old male" in ut.text[0]


class _ZipHandler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *a):
        pass


@pytest.fixture()
def zip_server(tmp_path):
    folder = write_ml100k(tmp_path / "src", n_users=10, n_items=12)
    _ZipHandler.payload = zip_folder(folder)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ZipHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/ml-100k.zip", hashlib.md5(_ZipHandler.payload).hexdigest()
    srv.shutdown()


def test_download_verifies_checksum(zip_server, tmp_path, monkeypatch):
    url, md5 = zip_server
    folder = download_and_extract(url, md5, tmp_path / "dl", "ml-100k", progress=False)
    assert (folder / "u.data").is_file()
    with pytest.raises(DataError, match="checksum mismatch"):
        download_and_extract(url, "0" * 32, tmp_path / "dl2", "ml-100k", progress=False)
    assert not (tmp_path / "dl2" / "ml-100k.zip").exists()  # a bad archive is not kept
    # The loader downloads into the cache when the data folder lacks the dataset.
    spec = SPECS["ml-100k"]
    monkeypatch.setitem(SPECS, "ml-100k", DatasetSpec(**{**spec.__dict__, "url": url, "md5": md5}))
    ds = load_movielens("ml-100k", data_dir=None, cache_dir=tmp_path / "cache", download=True, progress=False)
    assert ds.ratings.user_id.nunique() == 10
    assert (tmp_path / "cache" / "downloads" / "ml-100k" / "u.data").is_file()


def test_no_download_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_movielens("ml-100k", data_dir=tmp_path, cache_dir=tmp_path / "c", download=False)


# ---------------------------------------------------------------- ml-25m, the typed ratings.csv parse, splits


def test_ml25m_spec_and_loader(data_root, tmp_path):
    spec = SPECS["ml-25m"]
    assert spec.url == "https://files.grouplens.org/datasets/movielens/ml-25m.zip"
    assert spec.md5 == "6b51fb2759a8657d3bfcbfc42b592ada"
    assert spec.scale.step == 0.5
    # Same files as ml-latest-small (ratings.csv, movies.csv): a fixture copy under the ml-25m name.
    d = tmp_path / "d"
    shutil.copytree(data_root / "ml-latest-small", d / "ml-25m")
    ds = load_movielens("ml-25m", data_dir=d, cache_dir=tmp_path / "c", download=False)
    ref = load_movielens("ml-latest-small", data_dir=data_root, cache_dir=tmp_path / "c2", download=False)
    pd.testing.assert_frame_equal(ds.ratings, ref.ratings)
    assert ds.name == "ml-25m" and ds.scale == ref.scale


def test_ratings_csv_errors_stay_strict(data_root, tmp_path):
    d = _copy(data_root, tmp_path, "ml-latest-small")
    p = d / "ml-latest-small" / "ratings.csv"
    lines = p.read_text().splitlines()
    for bad, msg in [("1,20,,964982703", r"ratings.csv: malformed row at line 6"),
                     ("1,abc,4.0,964982703", r"line 6: item_id is 'abc'"),
                     ("1,20,4.0", r"ratings.csv: malformed row at line 6"),
                     ("1,20,4.0,964982703,9", r"ratings.csv: malformed row, line 6"),
                     ("1,20,4.2,964982703", r"rating 4.2 .* outside the scale")]:
        p.write_text("\r\n".join(lines[:5] + [bad] + lines[6:]) + "\r\n")
        with pytest.raises(DataError, match=msg):
            load_movielens("ml-latest-small", data_dir=d, cache_dir=tmp_path / "c", download=False, use_cache=False)


def _reference_holdout(ratings, frac, seed, by_time):
    """The per-user hold-out as first written (sorted frame + groupby), to check the array version."""
    rng = np.random.default_rng(seed)
    df = ratings.reset_index(drop=True)
    tie = rng.random(len(df))
    order = np.lexsort((tie, df["timestamp"].to_numpy(), df["user_id"].to_numpy())) if by_time else \
        np.lexsort((tie, df["user_id"].to_numpy()))
    df = df.iloc[order].reset_index(drop=True)
    pos = df.groupby("user_id").cumcount().to_numpy()
    n = df.groupby("user_id")["user_id"].transform("size").to_numpy()
    n_test = np.minimum(np.floor(n * frac + 0.5).astype(int), n - 1)
    is_test = pos >= n - n_test
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


@pytest.mark.parametrize("by_time", [True, False])
def test_generated_splits_match_the_reference(ml100k, by_time):
    from rlsim.data.splits import _per_user_holdout

    r = ml100k.ratings.sample(frac=1.0, random_state=1)  # any input order
    for seed in (0, 5):
        a = _per_user_holdout(r, 0.2, seed, by_time)
        b = _reference_holdout(r, 0.2, seed, by_time)
        pd.testing.assert_frame_equal(a[0], b[0])
        pd.testing.assert_frame_equal(a[1], b[1])
