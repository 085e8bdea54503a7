"""Persona profiles built from training ratings only.

- structured: no LLM. Rating mean/std/histogram, genre affinities, favourite and disliked
  movies, demographics.
- psych: the cs234-paper psychological profile from an LLM with a JSON schema (Big Five,
  sensation seeking, empathy, cognitive style, closure vs exploration, genres, movies, notes).
- lusifer: Lusifer's incremental summary: the user's last N training ratings in time order, in
  batches, the LLM updating the summary after each batch.

Profiles are stored as OUT/profiles.parquet (user_id, kind, profile_json, text) beside
OUT/profile_ratings.parquet, the training ratings they were built from.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pandas as pd

from rlsim.data.schema import RatingScale, genre_list
from rlsim.data.text import user_text
from rlsim.errors import RlsimError
from rlsim.io import write_parquet
from rlsim.personas.prompts import (PSYCH_SCHEMA, SUMMARY_SCHEMA, movie_label, psych_messages,
                                    summary_messages)

KINDS = ("structured", "psych", "lusifer")


def structured_profiles(train: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, scale: RatingScale,
                        n_movies: int = 4, n_genres: int = 3) -> dict[int, dict]:
    """user_id -> structured profile dict (no LLM)."""
    item_genres = dict(zip(items["item_id"], (genre_list(g) for g in items["genres"])))
    labels = {int(r["item_id"]): movie_label(r) for r in items.to_dict("records")}
    pop = train.groupby("item_id").size()
    demo = {int(r["user_id"]): r for r in users.to_dict("records")}
    out = {}
    for u, g in train.groupby("user_id", sort=True):
        r = g["rating"].to_numpy(float)
        mean = float(r.mean())
        hist = np.bincount(scale.to_class(r), minlength=scale.n_classes)
        rows = [(gen, x - mean) for it, x in zip(g["item_id"], r) for gen in item_genres.get(it, [])]
        aff = pd.DataFrame(rows, columns=["genre", "delta"]).groupby("genre")["delta"].agg(["mean", "size"]) \
            if rows else pd.DataFrame(columns=["mean", "size"])
        # Damped affinities: a genre seen twice says less than one seen twenty times.
        aff["score"] = aff["mean"] * aff["size"] / (aff["size"] + 3.0)
        aff = aff.sort_values("score", ascending=False)
        g2 = g.assign(pop=g["item_id"].map(pop).fillna(0))
        fav = g2.sort_values(["rating", "pop"], ascending=[False, False]).head(n_movies)
        bad = g2[g2["rating"] < mean].sort_values(["rating", "pop"], ascending=[True, False]).head(n_movies)
        d = demo.get(int(u))
        out[int(u)] = {
            "user_id": int(u), "n_ratings": int(len(r)), "mean": round(mean, 2), "std": round(float(r.std()), 2),
            "histogram": {f"{v:g}": int(c) for v, c in zip(scale.values, hist)},
            "liked_genres": [gname for gname, s in aff["score"].items() if s > 0.05][:n_genres],
            "disliked_genres": [gname for gname, s in aff["score"][::-1].items() if s < -0.05][:n_genres],
            "favourite_movies": [labels.get(int(i), str(i)) for i in fav["item_id"]],
            "disliked_movies": [labels.get(int(i), str(i)) for i in bad["item_id"]],
            "demographics": user_text(d) if d is not None else "",
        }
    return out


def structured_text(p: dict, scale: RatingScale) -> str:
    n = max(1, p["n_ratings"])
    hi, lo = f"{scale.max:g}", f"{scale.min:g}"
    parts = [p.get("demographics") or "A movie viewer.",
             f"Average rating {p['mean']:.1f} (sd {p['std']:.1f}); {100 * p['histogram'].get(hi, 0) / n:.0f}% "
             f"{hi}s, {100 * p['histogram'].get(lo, 0) / n:.0f}% {lo}s."]
    if p["liked_genres"]:
        parts.append("Likes " + ", ".join(p["liked_genres"]) + ".")
    if p["disliked_genres"]:
        parts.append("Less keen on " + ", ".join(p["disliked_genres"]) + ".")
    if p["favourite_movies"]:
        parts.append("Loved: " + "; ".join(p["favourite_movies"]) + ".")
    if p["disliked_movies"]:
        parts.append("Disliked: " + "; ".join(p["disliked_movies"]) + ".")
    return " ".join(parts)


def psych_text(p: dict) -> str:
    traits = ", ".join(f"{k.replace('_', ' ')} {p[k]}" for k in (
        "openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism", "sensation_seeking",
        "empathy") if k in p)
    return (f"Traits: {traits}. Prefers {p.get('cognitive_style', '')}; {p.get('closure_vs_exploration', '')}. "
            f"Genres: {', '.join(p.get('preferred_genres', [])[:4])}. Loved: {'; '.join(p.get('favourite_movies', [])[:3])}. "
            f"Disliked: {'; '.join(p.get('disliked_movies', [])[:3])}. {p.get('observations', '')}").strip()


def history_lines(g: pd.DataFrame, labels: dict[int, str]) -> list[str]:
    return [f"{labels.get(int(i), str(i))}: {r:g}" for i, r in zip(g["item_id"], g["rating"])]


async def _llm_profiles(kind: str, train, items, structured: dict[int, dict], scale, engine, concurrency: int,
                        last_n: int, batch: int, progress: bool) -> dict[int, dict]:
    labels = {int(r["item_id"]): movie_label(r) for r in items.to_dict("records")}
    sem = asyncio.Semaphore(max(1, concurrency))
    by_user = {int(u): g.sort_values("timestamp", kind="stable") for u, g in train.groupby("user_id")}

    async def one(u: int) -> tuple[int, dict]:
        g = by_user[u]
        async with sem:
            if kind == "psych":
                lines = history_lines(g.tail(last_n), labels)
                text = await engine.complete(psych_messages(
                    f"User {u}. " + structured_text(structured[u], scale), lines), PSYCH_SCHEMA)
                try:
                    obj = json.loads(text)
                except (json.JSONDecodeError, TypeError):
                    return u, {"error": "malformed_json"}
                return u, obj if isinstance(obj, dict) else {"error": "malformed_json"}
            summary = ""
            recent = g.tail(last_n)
            for s in range(0, len(recent), batch):
                text = await engine.complete(summary_messages(summary, history_lines(recent.iloc[s:s + batch], labels)),
                                             SUMMARY_SCHEMA)
                try:
                    summary = str(json.loads(text)["summary"])
                except (json.JSONDecodeError, TypeError, KeyError):
                    pass  # keep the previous summary; the batch is recorded as unused
            return u, {"summary": summary, "ratings_used": int(len(recent))}

    out = {}
    from tqdm import tqdm

    bar = tqdm(total=len(structured), desc=f"{kind} profiles", disable=not progress)
    for fut in asyncio.as_completed([one(u) for u in structured if u in by_user]):
        u, p = await fut
        out[u] = p
        bar.update(1)
    bar.close()
    return out


def build_profiles(kind: str, train: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, scale: RatingScale,
                   engine=None, concurrency: int = 8, last_n: int = 60, batch: int = 20,
                   progress: bool = False) -> pd.DataFrame:
    """One row per user: user_id, kind, profile_json, text."""
    if kind not in KINDS:
        raise RlsimError(f"unknown profile kind '{kind}' (known: {', '.join(KINDS)})")
    st = structured_profiles(train, items, users, scale)
    if kind == "structured":
        rows = [(u, json.dumps(p), structured_text(p, scale)) for u, p in st.items()]
    else:
        if engine is None:
            raise RlsimError(f"'{kind}' profiles need an LLM backend (--backend openai)")
        got = asyncio.run(_llm_profiles(kind, train, items, st, scale, engine, concurrency, last_n, batch, progress))
        rows = []
        for u in st:
            p = got.get(u, {"error": "not built"})
            if kind == "psych":
                text = psych_text(p) if "error" not in p else structured_text(st[u], scale)
            else:
                text = (structured_text(st[u], scale) + " " + p.get("summary", "")).strip()
            rows.append((u, json.dumps(p), text))
    return pd.DataFrame(rows, columns=["user_id", "profile_json", "text"]).assign(kind=kind)[
        ["user_id", "kind", "profile_json", "text"]]


def save_profiles(df: pd.DataFrame, train: pd.DataFrame, out_dir) -> None:
    from pathlib import Path

    out = Path(out_dir)
    write_parquet(df, out / "profiles.parquet")
    write_parquet(train[train["user_id"].isin(df["user_id"])], out / "profile_ratings.parquet")


def load_profile_texts(path) -> dict[int, str]:
    from pathlib import Path

    p = Path(path)
    f = p / "profiles.parquet" if p.is_dir() else p
    if not f.is_file():
        raise RlsimError(f"no profiles at {f} (run `rlsim personas profile` first)")
    df = pd.read_parquet(f)
    return dict(zip(df["user_id"].astype(int), df["text"]))
