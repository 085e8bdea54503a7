"""rlsim.data's shape (issue 18) and the on-disk caches that must survive refactors of it.

Caches already on users' disks stay valid only while their names and files stay the same: the pinned
names below change only when the cache key does (then bump CACHE_VERSION / GENERATOR_VERSION on purpose).
"""

from __future__ import annotations

from pathlib import Path

import rlsim.data
from rlsim.data import load_movielens

MAX_LINES = 400


def test_data_modules_are_small():
    pkg = Path(rlsim.data.__file__).parent
    lines = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in sorted(pkg.glob("*.py"))}
    big = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not big, f"rlsim/data modules over {MAX_LINES} lines: {big}"


def test_movielens_cache_files_are_unchanged(data_root, tmp_path):
    load_movielens("ml-100k", data_dir=data_root, cache_dir=tmp_path, download=False)
    (folder,) = (tmp_path / "datasets").iterdir()
    assert folder.name.startswith("ml-100k-") and len(folder.name) == len("ml-100k-") + 12
    splits = [f"split_{s}_{part}.parquet" for s in ("u1", "u2", "u3", "u4", "u5") for part in ("train", "test")]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["items.parquet", "meta.json", "ratings.parquet", "users.parquet"] + splits)


def test_synthetic_preset_cache_name_is_unchanged(data_root, tmp_path):
    """The preset's cache folder is keyed on its SynthConfig and the source's summary (the fixture's
    ml-100k: seeded, so its summary is fixed)."""
    ds = load_movielens("synthetic-100k-from-ml-100k", data_dir=data_root, cache_dir=tmp_path, download=False,
                        progress=False)
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == ["synthetic-100k-from-ml-100k-fe0c74091e89"]
    assert len(ds.ratings) == 100_000
