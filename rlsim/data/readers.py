"""Strict readers of the MovieLens file formats: one parser per release layout, and the overviews CSV.

Parsing is strict: a missing file, a short row or a non-numeric id stops the load with a
one-line DataError naming the file and line, instead of silently dropping ratings.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Callable

import pandas as pd

from rlsim.data.schema import RatingScale, normalise_ratings
from rlsim.errors import DataError

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
