"""MovieLens releases: where they come from, checksums, and a Parquet cache of the parsed tables.

The per-release file parsers live in rlsim.data.readers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rlsim.data.download import download_and_extract, md5_file
from rlsim.data.readers import PARSERS, read_overviews
from rlsim.data.schema import ITEM_COLUMNS, USER_COLUMNS, Dataset, RatingScale
from rlsim.errors import DataError

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    url: str
    # md5 of the zip; None means read it from the provider's sidecar (md5_url).
    md5: str | None
    folder: str
    required: tuple[str, ...]
    scale: RatingScale
    md5_url: str | None = None
    # md5 of member files, checked by `rlsim data verify` on local copies.
    member_md5: dict[str, str] = field(default_factory=dict)


SPECS: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        name="ml-100k",
        url=GROUPLENS + "ml-100k.zip",
        md5="0e33842e24a9c977be4e0107933c0723",
        folder="ml-100k",
        required=("u.data", "u.item", "u.user"),
        scale=RatingScale(1.0, 5.0, 1.0),
        member_md5={
            "u.data": "6e47046882bad158b0efbb84cd5cb987",
            "u.item": "c9e7f390115d79079537301d5204f3f7",
            "u.user": "1b53539edc13caad0282c8500608a319",
        },
    ),
    "ml-latest-small": DatasetSpec(
        name="ml-latest-small",
        url=GROUPLENS + "ml-latest-small.zip",
        # "latest" is re-released; trust the provider's published checksum for the archive.
        md5=None,
        md5_url=GROUPLENS + "ml-latest-small.zip.md5",
        folder="ml-latest-small",
        required=("ratings.csv", "movies.csv"),
        scale=RatingScale(0.5, 5.0, 0.5),
        member_md5={
            "ratings.csv": "325a6f09399d1c45671f187505e1a100",
            "movies.csv": "ed94fab72b62442ef8150d9446e000d6",
        },
    ),
    "ml-1m": DatasetSpec(
        name="ml-1m",
        url=GROUPLENS + "ml-1m.zip",
        md5="c4d9eecfca2ab87c1945afe126590906",
        folder="ml-1m",
        required=("ratings.dat", "movies.dat", "users.dat"),
        scale=RatingScale(1.0, 5.0, 1.0),
    ),
    "ml-25m": DatasetSpec(
        name="ml-25m",
        url=GROUPLENS + "ml-25m.zip",
        md5="6b51fb2759a8657d3bfcbfc42b592ada",
        folder="ml-25m",
        required=("ratings.csv", "movies.csv"),
        scale=RatingScale(0.5, 5.0, 0.5),
    ),
}

CACHE_VERSION = 1


def get_spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(SPECS)}, "
                        "synthetic-100k|1m|10m|25m[-from-<source>])")
    return SPECS[name]


# ---------------------------------------------------------------- locating and caching


def locate(spec: DatasetSpec, data_dir: Path | None) -> Path | None:
    """The folder holding the dataset's files: data_dir/<folder> or data_dir itself."""
    if data_dir is None:
        return None
    for cand in (data_dir / spec.folder, data_dir):
        if all((cand / f).is_file() for f in spec.required):
            return cand
    return None


def verify_members(spec: DatasetSpec, folder: Path) -> dict[str, dict]:
    """md5 of each known member file of a local copy against the official release."""
    report = {}
    for fname, expected in spec.member_md5.items():
        path = folder / fname
        got = md5_file(path) if path.is_file() else None
        report[fname] = {"expected": expected, "got": got, "ok": got == expected}
    return report


def _source_key(folder: Path, overviews: Path | None) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    key = {"version": CACHE_VERSION, "folder": str(folder.resolve()),
           "files": {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files}}
    if overviews is not None:
        key["overviews"] = [str(overviews.resolve()), overviews.stat().st_size, int(overviews.stat().st_mtime)]
    return key


def _cache_dir(cache_root: Path, name: str, key: dict) -> Path:
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root / "datasets" / f"{name}-{digest}"


def _write_cache(ds: Dataset, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    ds.ratings.to_parquet(tmp / "ratings.parquet", index=False)
    ds.items.to_parquet(tmp / "items.parquet", index=False)
    ds.users.to_parquet(tmp / "users.parquet", index=False)
    for split, (train, test) in ds.official_splits.items():
        train.to_parquet(tmp / f"split_{split}_train.parquet", index=False)
        test.to_parquet(tmp / f"split_{split}_test.parquet", index=False)
    (tmp / "meta.json").write_text(json.dumps({"name": ds.name, "splits": sorted(ds.official_splits)}))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.replace(path)


def _read_cache(path: Path, spec: DatasetSpec) -> Dataset:
    meta = json.loads((path / "meta.json").read_text())
    splits = {s: (pd.read_parquet(path / f"split_{s}_train.parquet"), pd.read_parquet(path / f"split_{s}_test.parquet"))
              for s in meta["splits"]}
    return Dataset(name=spec.name, ratings=pd.read_parquet(path / "ratings.parquet"),
                   items=pd.read_parquet(path / "items.parquet"), users=pd.read_parquet(path / "users.parquet"),
                   scale=spec.scale, official_splits=splits)


def default_overviews(spec: DatasetSpec, data_dir: Path | None, folder: Path) -> Path | None:
    names = [f"{spec.name}_overviews.csv", "overviews.csv"]
    roots = [d for d in (data_dir, folder, folder.parent) if d is not None]
    for root in roots:
        for sub in ("overviews", "."):
            for n in names:
                p = root / sub / n
                if p.is_file():
                    return p
    return None


def load_movielens(
    name: str,
    data_dir: str | Path | None = None,
    cache_dir: str | Path = "~/.cache/rlsim",
    overviews: str | Path | None = None,
    download: bool = True,
    use_cache: bool = True,
    progress: bool = True,
) -> Dataset:
    """Load a MovieLens release in the canonical schema.

    Looks in data_dir (either data_dir/<name>/ or data_dir itself), then in cache_dir; when
    absent and download is True, fetches the official archive from GroupLens into
    cache_dir (or data_dir when given) and checks its md5.
    """
    from rlsim.data import synthetic

    if synthetic.is_synthetic(name):
        def load_source(src: str) -> Dataset:
            if synthetic.is_synthetic(src):
                raise DataError(f"the source of a synthetic dataset must be a real one, not {src}")
            return load_movielens(src, data_dir=data_dir, cache_dir=cache_dir, overviews=overviews,
                                  download=download, use_cache=use_cache, progress=progress)

        return synthetic.load_synthetic(name, data_dir, cache_dir, load_source, progress=progress)
    spec = get_spec(name)
    cache_root = Path(cache_dir).expanduser()
    ddir = Path(data_dir).expanduser() if data_dir is not None else None
    folder = locate(spec, ddir) or locate(spec, cache_root / "downloads")
    if folder is None:
        if ddir is not None and ddir.exists() and any(ddir.iterdir()) and not download:
            missing = [f for f in spec.required if not (ddir / spec.folder / f).is_file() and not (ddir / f).is_file()]
            raise DataError(f"{name} not found in {ddir}: missing {', '.join(missing)}")
        if not download:
            where = ddir if ddir is not None else cache_root / "downloads"
            raise DataError(f"{name} not found in {where} and downloading is off")
        folder = download_and_extract(spec.url, spec.md5, cache_root / "downloads", spec.folder,
                                      md5_url=spec.md5_url, progress=progress)
        missing = [f for f in spec.required if not (folder / f).is_file()]
        if missing:
            raise DataError(f"downloaded {name} lacks {', '.join(missing)}")
    ov_path = Path(overviews).expanduser() if overviews else default_overviews(spec, ddir, folder)
    if overviews and not ov_path.is_file():
        raise DataError(f"missing overviews file: {ov_path}")
    cpath = _cache_dir(cache_root, name, _source_key(folder, ov_path))
    if use_cache and (cpath / "meta.json").is_file():
        return _read_cache(cpath, spec)
    ratings, items, users, splits = PARSERS[name](folder, spec.scale)
    if ov_path is not None:
        ov = read_overviews(ov_path).set_index("item_id")["overview"]
        items["overview"] = items["item_id"].map(ov).fillna("").astype(str)
    items = items[ITEM_COLUMNS].reset_index(drop=True)
    users = users[USER_COLUMNS].reset_index(drop=True)
    ds = Dataset(name=name, ratings=ratings, items=items, users=users, scale=spec.scale, official_splits=splits)
    unknown = set(ratings.item_id.unique()) - set(items.item_id)
    if unknown:
        raise DataError(f"{name}: {len(unknown)} rated item id(s) missing from the item file, e.g. {min(unknown)}")
    if use_cache:
        try:
            _write_cache(ds, cpath)
        except OSError:
            pass  # A read-only cache only costs a re-parse next time.
    return ds
