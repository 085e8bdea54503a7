"""Generator of small MovieLens-format datasets with real structure (users have tastes).

Ratings come from a low-rank model plus user and item biases, so a model that learns
beats the baselines, and a policy that learns beats random.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from rlsim.data.readers import ML100K_GENRES

OCCUPATIONS = ["engineer", "student", "writer", "artist", "educator", "other"]
WORDS = ["space", "love", "war", "detective", "robot", "family", "island", "crime", "music", "ghost",
         "city", "dragon", "school", "heist", "storm", "secret"]


def synth_ratings(n_users=60, n_items=80, density=0.35, seed=0, half_stars=False):
    """(users, items, ratings array [user, item, rating, ts], item genre flags, latent factors)."""
    rng = np.random.default_rng(seed)
    k = 3
    U = rng.normal(0, 1, (n_users, k))
    V = rng.normal(0, 1, (n_items, k))
    bu = rng.normal(0, 0.4, n_users)
    bi = rng.normal(0, 0.5, n_items)
    # Genres follow the latent factors so text carries signal.
    genre_of_factor = [1, 5, 8]  # Action, Comedy, Drama
    flags = np.zeros((n_items, len(ML100K_GENRES)), dtype=int)
    for j in range(n_items):
        flags[j, genre_of_factor[int(np.argmax(V[j]))]] = 1
        if rng.random() < 0.3:
            flags[j, rng.integers(1, len(ML100K_GENRES))] = 1
    rows = []
    t0 = 880_000_000
    for u in range(n_users):
        n = max(8, int(density * n_items * rng.uniform(0.6, 1.4)))
        items = rng.choice(n_items, size=min(n, n_items), replace=False)
        for j in items:
            score = 3.4 + bu[u] + bi[j] + 0.6 * U[u] @ V[j] + rng.normal(0, 0.4)
            if half_stars:
                r = float(np.clip(np.round(score * 2) / 2, 0.5, 5.0))
            else:
                r = float(np.clip(np.round(score), 1, 5))
            rows.append((u + 1, j + 1, r, t0 + int(rng.integers(0, 10_000_000))))
    return np.array(rows, dtype=object), flags, (U, V, bu, bi)


def write_ml100k(root: Path, n_users=60, n_items=80, seed=0, folds=True) -> Path:
    """An ml-100k folder (u.data, latin-1 u.item, u.user, u1..u5 folds) under root/ml-100k."""
    folder = Path(root) / "ml-100k"
    folder.mkdir(parents=True, exist_ok=True)
    ratings, flags, _ = synth_ratings(n_users, n_items, seed=seed)
    lines = [f"{u}\t{i}\t{int(r)}\t{t}" for u, i, r, t in ratings]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(seed + 1)
    item_lines = []
    for j in range(n_items):
        # Accented titles exercise the latin-1 decoding of u.item.
        title = f"Film {j + 1} {'Amélie ' if j % 7 == 0 else ''}({1980 + j % 20})"
        date = f"01-Jan-{1980 + j % 20}"
        item_lines.append("|".join([str(j + 1), title, date, "", "http://example.invalid/"] + [str(x) for x in flags[j]]))
    (folder / "u.item").write_bytes(("\n".join(item_lines) + "\n").encode("latin-1"))
    user_lines = [f"{u + 1}|{int(rng.integers(18, 70))}|{'MF'[u % 2]}|{OCCUPATIONS[u % len(OCCUPATIONS)]}|{10000 + u}"
                  for u in range(n_users)]
    (folder / "u.user").write_text("\n".join(user_lines) + "\n")
    if folds:
        perm = rng.permutation(len(lines))
        parts = np.array_split(perm, 5)
        for f in range(5):
            test_idx = set(parts[f].tolist())
            (folder / f"u{f + 1}.base").write_text("\n".join(l for k, l in enumerate(lines) if k not in test_idx) + "\n")
            (folder / f"u{f + 1}.test").write_text("\n".join(lines[k] for k in sorted(test_idx)) + "\n")
    return folder


def write_overviews(root: Path, n_items=80, seed=0) -> Path:
    rng = np.random.default_rng(seed + 2)
    path = Path(root) / "overviews" / "ml-100k_overviews.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["movie_id,title,overview,tmdb_id,imdb_id,source"]
    for j in range(n_items):
        if j % 10 == 9:
            continue  # some films have no overview
        words = " ".join(rng.choice(WORDS, size=6))
        lines.append(f'{j + 1},Film {j + 1},"A story about {words}, told ""simply"".",{j},tt{j:07d},test')
    path.write_text("\n".join(lines) + "\n")
    return path


def write_latest_small(root: Path, n_users=40, n_items=60, seed=0) -> Path:
    folder = Path(root) / "ml-latest-small"
    folder.mkdir(parents=True, exist_ok=True)
    ratings, flags, _ = synth_ratings(n_users, n_items, seed=seed, half_stars=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\r\n" + "".join(f"{u},{i * 10},{r:.1f},{t}\r\n" for u, i, r, t in ratings))
    movies = ["movieId,title,genres"]
    for j in range(n_items):
        g = "|".join(ML100K_GENRES[k] for k in np.nonzero(flags[j])[0]) or "(no genres listed)"
        movies.append(f'{(j + 1) * 10},"Film, The {j + 1} ({1990 + j % 25})",{g}')
    (folder / "movies.csv").write_text("\r\n".join(movies) + "\r\n")
    (folder / "links.csv").write_text("movieId,imdbId,tmdbId\r\n" + "".join(f"{(j + 1) * 10},{j:07d},{j}\r\n" for j in range(n_items)))
    return folder


def write_ml1m(root: Path, n_users=30, n_items=40, seed=0) -> Path:
    folder = Path(root) / "ml-1m"
    folder.mkdir(parents=True, exist_ok=True)
    ratings, flags, _ = synth_ratings(n_users, n_items, seed=seed)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in ratings))
    movies = [f"{j + 1}::Film {j + 1} ({1990 + j % 10})::"
              + "|".join(ML100K_GENRES[k] for k in np.nonzero(flags[j])[0]) for j in range(n_items)]
    (folder / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    (folder / "users.dat").write_text("".join(f"{u + 1}::{'MF'[u % 2]}::25::{u % 21}::12345\n" for u in range(n_users)))
    return folder


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"{folder.name}/{p.relative_to(folder)}")
    return buf.getvalue()
