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

import pandas as pd

from rlsim.data.schema import RatingScale, genre_list
from rlsim.data.text import user_text
from rlsim.errors import RlsimError
from rlsim.io import write_parquet
from rlsim.personas.prompts import (PSYCH_SCHEMA, SUMMARY_SCHEMA, movie_label, psych_messages,
                                    summary_messages)

KINDS = ("structured", "psych", "lusifer")


def structured_profiles(train: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, scale: RatingScale,
                        n_movies: int = 3, n_genres: int = 3) -> dict[int, dict]:
    """user_id -> structured profile dict (no LLM); whole-frame group-bys, no per-user loops over frames."""
    labels = {int(r["item_id"]): movie_label({**r, "genres": ""}) for r in items.to_dict("records")}
    demo = {int(r["user_id"]): r for r in users.to_dict("records")}
    t = train[["user_id", "item_id", "rating"]].copy()
    stats = t.groupby("user_id")["rating"].agg(["mean", "std", "size"])
    t["delta"] = t["rating"] - t["user_id"].map(stats["mean"])
    t["pop"] = t["item_id"].map(t.groupby("item_id").size())
    # Genre affinity: mean deviation from the user's own mean, damped by how often the genre was seen.
    gen = items[["item_id", "genres"]].assign(genre=items["genres"].map(genre_list)).explode("genre").dropna()
    tg = t.merge(gen[["item_id", "genre"]], on="item_id")
    aff = tg.groupby(["user_id", "genre"])["delta"].agg(["mean", "size"])
    aff["score"] = aff["mean"] * aff["size"] / (aff["size"] + 3.0)
    aff = aff.reset_index().sort_values(["user_id", "score"], ascending=[True, False])
    liked = aff[aff["score"] > 0.05].groupby("user_id")["genre"].apply(lambda s: list(s[:n_genres]))
    disliked = aff[aff["score"] < -0.05].sort_values(["user_id", "score"]).groupby("user_id")["genre"].apply(
        lambda s: list(s[:n_genres]))
    fav = t.sort_values(["user_id", "rating", "pop"], ascending=[True, False, False]).groupby("user_id").head(n_movies)
    bad = t[t["delta"] < 0].sort_values(["user_id", "rating", "pop"], ascending=[True, True, False]) \
        .groupby("user_id").head(n_movies)
    fav_l = fav.groupby("user_id")["item_id"].apply(list)
    bad_l = bad.groupby("user_id")["item_id"].apply(list)
    cls = pd.DataFrame({"user_id": t["user_id"], "c": scale.to_class(t["rating"])})
    hist = cls.groupby(["user_id", "c"]).size().unstack(fill_value=0).reindex(columns=range(scale.n_classes),
                                                                               fill_value=0)
    out = {}
    for u, row in stats.iterrows():
        u = int(u)
        d = demo.get(u)
        out[u] = {
            "user_id": u, "n_ratings": int(row["size"]), "mean": round(float(row["mean"]), 2),
            "std": round(float(row["std"]) if row["size"] > 1 else 0.0, 2),
            "histogram": {f"{v:g}": int(c) for v, c in zip(scale.values, hist.loc[u].to_numpy())},
            "liked_genres": liked.get(u, []), "disliked_genres": disliked.get(u, []),
            "favourite_movies": [labels.get(int(i), str(i)) for i in fav_l.get(u, [])],
            "disliked_movies": [labels.get(int(i), str(i)) for i in bad_l.get(u, [])],
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
