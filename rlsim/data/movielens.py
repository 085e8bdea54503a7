"""MovieLens releases: where they come from, how their files are parsed, and a Parquet cache.

Parsing is strict: a missing file, a short row or a non-numeric id stops the load with a
one-line DataError naming the file and line, instead of silently dropping ratings.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from rlsim.data.download import download_and_extract, md5_file
from rlsim.data.schema import ITEM_COLUMNS, USER_COLUMNS, Dataset, RatingScale, normalise_ratings
from rlsim.errors import DataError

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]
# ml-1m codes occupations as integers (see its README).
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]


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


# ---------------------------------------------------------------- strict table reading


def read_table(
    path: Path,
    sep: str,
    names: list[str],
    numeric: list[str],
    encoding: str = "utf-8",
    header: bool = False,
) -> pd.DataFrame:
    """Read a delimited file as strings, then check every row has every field and numeric ids."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name}: not valid {encoding} text ({exc.reason} at byte {exc.start})") from None
    if sep == "::":
        # Titles never contain a tab; this keeps pandas on its fast C parser.
        text, sep = text.replace("::", "\t"), "\t"
    try:
        df = pd.read_csv(
            io.StringIO(text), sep=sep, header=0 if header else None, names=names, dtype=str,
            quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE, keep_default_na=False,
            on_bad_lines="error", engine="c", skip_blank_lines=True,
        )
    except pd.errors.ParserError as exc:
        msg = str(exc).strip().splitlines()[-1]
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", msg)
        if m:
            msg = f"line {m.group(2)}: expected {m.group(1)} fields, saw {m.group(3)}"
        raise DataError(f"{path.name}: malformed row, {msg}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path.name}: file is empty") from None
    offset = 2 if header else 1
    if header and len(df) == 0 and not text.strip():
        raise DataError(f"{path.name}: file is empty")
    # Fewer fields than expected leaves trailing columns empty/NaN.
    short = df[numeric].isna() | (df[numeric] == "")
    if short.any().any():
        row = int(short.any(axis=1).to_numpy().nonzero()[0][0])
        raise DataError(f"{path.name}: malformed row at line {row + offset}: missing field(s)")
    for col in numeric:
        conv = pd.to_numeric(df[col].str.strip(), errors="coerce")
        bad = conv.isna().to_numpy().nonzero()[0]
        if len(bad):
            row = int(bad[0])
            raise DataError(
                f"{path.name}: malformed row at line {row + offset}: {col} is {df[col].iloc[row]!r}, not a number"
            )
        df[col] = conv
    return df


def _check_scale(ratings: pd.DataFrame, scale: RatingScale, fname: str) -> None:
    r = ratings["rating"].to_numpy()
    off = (r < scale.min) | (r > scale.max) | (abs(scale.round(r) - r) > 1e-9)
    if off.any():
        i = int(off.nonzero()[0][0])
        raise DataError(
            f"{fname}: rating {r[i]} at row {i + 1} is outside the scale {scale.min}..{scale.max} step {scale.step}"
        )


def _year(title: pd.Series) -> pd.Series:
    return title.str.extract(r"\((\d{4})\)\s*$")[0].astype("Int64")


# ---------------------------------------------------------------- ml-100k


def _ml100k_ratings(path: Path) -> pd.DataFrame:
    df = read_table(path, "\t", ["user_id", "item_id", "rating", "timestamp"],
                    ["user_id", "item_id", "rating", "timestamp"])
    return normalise_ratings(df)


def _parse_ml100k(folder: Path, scale: RatingScale):
    ratings = _ml100k_ratings(folder / "u.data")
    _check_scale(ratings, scale, "u.data")
    names = ["item_id", "title", "release_date", "video_release_date", "imdb_url"] + ML100K_GENRES
    raw = read_table(folder / "u.item", "|", names, ["item_id"] + ML100K_GENRES, encoding="latin-1")
    flags = raw[ML100K_GENRES].to_numpy().astype(bool)
    genres = ["|".join(g for g, on in zip(ML100K_GENRES, row) if on and g != "unknown") for row in flags]
    release_year = pd.to_datetime(raw["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    year = _year(raw["title"]).fillna(release_year.astype("Int64"))
    items = pd.DataFrame({"item_id": raw["item_id"].astype("int64"), "title": raw["title"],
                          "year": year.astype("Int64"), "genres": genres, "overview": ""})
    u = read_table(folder / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip"], ["user_id", "age"])
    users = pd.DataFrame({"user_id": u["user_id"].astype("int64"), "age": u["age"].astype("Int64"),
                          "gender": u["gender"], "occupation": u["occupation"]})
    splits = {}
    for name in ["u1", "u2", "u3", "u4", "u5", "ua", "ub"]:
        base, test = folder / f"{name}.base", folder / f"{name}.test"
        if base.is_file() and test.is_file():
            splits[name] = (_ml100k_ratings(base), _ml100k_ratings(test))
    return ratings, items, users, splits


# ---------------------------------------------------------------- ml-latest-small, ml-25m


def _read_ratings_csv(path: Path) -> pd.DataFrame:
    """ratings.csv (userId,movieId,rating,timestamp) parsed straight into numbers.

    Strings for 25M rows would need several GB; any row the typed parse rejects sends the file
    through the strict reader, which names the file and line."""
    names = ["user_id", "item_id", "rating", "timestamp"]
    if path.is_file():
        try:
            df = pd.read_csv(path, header=0, names=names, engine="c", skip_blank_lines=True,
                             dtype={"user_id": "int64", "item_id": "int64", "rating": "float64",
                                    "timestamp": "int64"}, on_bad_lines="error")
            if not df["rating"].isna().any():
                return normalise_ratings(df)
        except (ValueError, TypeError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            pass
    return normalise_ratings(read_table(path, ",", names, names, header=True))


def _parse_latest_small(folder: Path, scale: RatingScale):
    ratings = _read_ratings_csv(folder / "ratings.csv")
    _check_scale(ratings, scale, "ratings.csv")
    m = read_table(folder / "movies.csv", ",", ["item_id", "title", "genres"], ["item_id"], header=True)
    title = m["title"].str.strip()
    items = pd.DataFrame({"item_id": m["item_id"].astype("int64"), "title": title, "year": _year(title),
                          "genres": m["genres"].where(m["genres"] != "(no genres listed)", ""), "overview": ""})
    user_ids = sorted(ratings.user_id.unique())
    users = pd.DataFrame({"user_id": pd.Series(user_ids, dtype="int64"), "age": pd.Series([pd.NA] * len(user_ids), dtype="Int64"),
                          "gender": "", "occupation": ""})
    return ratings, items, users, {}


# ---------------------------------------------------------------- ml-1m


def _parse_ml1m(folder: Path, scale: RatingScale):
    r = read_table(folder / "ratings.dat", "::", ["user_id", "item_id", "rating", "timestamp"],
                   ["user_id", "item_id", "rating", "timestamp"])
    ratings = normalise_ratings(r)
    _check_scale(ratings, scale, "ratings.dat")
    m = read_table(folder / "movies.dat", "::", ["item_id", "title", "genres"], ["item_id"], encoding="latin-1")
    items = pd.DataFrame({"item_id": m["item_id"].astype("int64"), "title": m["title"], "year": _year(m["title"]),
                          "genres": m["genres"], "overview": ""})
    u = read_table(folder / "users.dat", "::", ["user_id", "gender", "age", "occupation", "zip"],
                   ["user_id", "age", "occupation"])
    occ = u["occupation"].astype(int).map(lambda i: ML1M_OCCUPATIONS[i] if 0 <= i < len(ML1M_OCCUPATIONS) else "other")
    users = pd.DataFrame({"user_id": u["user_id"].astype("int64"), "age": u["age"].astype("Int64"),
                          "gender": u["gender"], "occupation": occ})
    return ratings, items, users, {}


PARSERS: dict[str, Callable] = {"ml-100k": _parse_ml100k, "ml-latest-small": _parse_latest_small, "ml-1m": _parse_ml1m,
                                "ml-25m": _parse_latest_small}


# ---------------------------------------------------------------- overviews


def read_overviews(path: str | Path) -> pd.DataFrame:
    """Plot overviews CSV -> (item_id, overview). Accepts the shared/datasets formats."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"missing overviews file: {p}")
    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    id_col = next((c for c in ("item_id", "movie_id", "movieId") if c in df.columns), None)
    if id_col is None or "overview" not in df.columns:
        raise DataError(f"{p.name}: expected an item_id/movie_id/movieId column and an overview column")
    if "tmdb_id_matches_links" in df.columns:
        # Rows whose TMDB id disagrees with links.csv describe another film.
        df = df[df["tmdb_id_matches_links"].str.lower() == "true"]
    ids = pd.to_numeric(df[id_col], errors="coerce")
    out = pd.DataFrame({"item_id": ids, "overview": df["overview"].str.strip()}).dropna(subset=["item_id"])
    out["item_id"] = out["item_id"].astype("int64")
    return out[out.overview.str.len() > 0].drop_duplicates("item_id")


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
