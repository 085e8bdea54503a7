"""Persona profiles built from training ratings only.

- structured: no LLM. Rating mean/std/histogram, genre affinities, favourite and disliked
  movies, demographics.
- psych: the cs234-paper psychological profile from an LLM with a JSON schema (Big Five,
  sensation seeking, empathy, cognitive style, closure vs exploration, genres, movies, notes).
- lusifer: Lusifer's incremental summary: the user's last N training ratings in time order, in
  batches, the LLM updating the summary after each batch.

Profiles are stored as OUT/profiles.parquet (user_id, kind, asked_kind, status, reason,
failed_batches, profile_json, text) beside OUT/profile_ratings.parquet, the training ratings they
were built from, and OUT/profiles.json (dataset, split and its fingerprint, counts of what was
built, fallbacks and failed Lusifer batches with their reasons).
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

PSYCH_REQUIRED = set(PSYCH_SCHEMA["json_schema"]["schema"]["required"])

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
    """user_id -> {"status": "ok"|"failed", "reason", "profile": dict, ...}; nothing is dropped silently."""
    labels = {int(r["item_id"]): movie_label(r) for r in items.to_dict("records")}
    sem = asyncio.Semaphore(max(1, concurrency))
    by_user = {int(u): g.sort_values("timestamp", kind="stable") for u, g in train.groupby("user_id")}

    async def one(u: int) -> tuple[int, dict]:
        g = by_user[u]
        async with sem:
            if kind == "psych":
                lines = history_lines(g.tail(last_n), labels)
                text, why = await engine.complete(psych_messages(
                    f"User {u}. " + structured_text(structured[u], scale), lines), PSYCH_SCHEMA)
                if why:
                    return u, {"status": "failed", "reason": why}
                try:
                    obj = json.loads(text)
                except (json.JSONDecodeError, TypeError):
                    return u, {"status": "failed", "reason": "malformed_json"}
                if not isinstance(obj, dict) or not PSYCH_REQUIRED <= set(obj):
                    return u, {"status": "failed", "reason": "incomplete_profile"}
                return u, {"status": "ok", "reason": "", "profile": obj}
            summary = ""
            recent = g.tail(last_n)
            used = n_batches = 0
            failed: dict[str, int] = {}
            for s in range(0, len(recent), batch):
                part = recent.iloc[s:s + batch]
                n_batches += 1
                text, why = await engine.complete(summary_messages(summary, history_lines(part, labels)),
                                                  SUMMARY_SCHEMA)
                if not why:
                    try:
                        new = json.loads(text)["summary"]
                        why = "" if isinstance(new, str) and new.strip() else "empty_summary"
                    except (json.JSONDecodeError, TypeError, KeyError):
                        why = "malformed_json"
                if why:  # the summary keeps what the earlier batches said; this batch is recorded as failed
                    failed[why] = failed.get(why, 0) + 1
                    continue
                summary = str(new)
                used += len(part)
            info = {"summary": summary, "ratings_used": int(used), "ratings_offered": int(len(recent)),
                    "batches": n_batches, "failed_batches": int(sum(failed.values())), "failed_reasons": failed}
            if not summary:
                return u, {"status": "failed", "reason": "no_batch_summarised", "profile": info}
            return u, {"status": "ok", "reason": "", "profile": info}

    out = {}
    from tqdm import tqdm

    bar = tqdm(total=len(structured), desc=f"{kind} profiles", disable=not progress)
    for fut in asyncio.as_completed([one(u) for u in structured if u in by_user]):
        u, p = await fut
        out[u] = p
        bar.update(1)
    bar.close()
    return out


PROFILE_COLUMNS = ["user_id", "kind", "asked_kind", "status", "reason", "failed_batches", "profile_json", "text"]


def build_profiles(kind: str, train: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, scale: RatingScale,
                   engine=None, concurrency: int = 8, last_n: int = 60, batch: int = 20,
                   progress: bool = False) -> pd.DataFrame:
    """One row per user: user_id, kind (what the text really is), asked_kind, status, reason,
    failed_batches (Lusifer), profile_json, text.

    A user whose LLM profile failed gets the structured profile, marked as such: kind
    'structured', status 'fallback' and the reason; never presented as the kind asked for.
    """
    if kind not in KINDS:
        raise RlsimError(f"unknown profile kind '{kind}' (known: {', '.join(KINDS)})")
    st = structured_profiles(train, items, users, scale)
    rows = []
    if kind == "structured":
        rows = [(u, "structured", kind, "ok", "", 0, json.dumps(p), structured_text(p, scale)) for u, p in st.items()]
    else:
        if engine is None:
            raise RlsimError(f"'{kind}' profiles need an LLM backend (--backend openai)")
        got = asyncio.run(_llm_profiles(kind, train, items, st, scale, engine, concurrency, last_n, batch, progress))
        for u in st:
            r = got.get(u, {"status": "failed", "reason": "not built"})
            fb = int(r.get("profile", {}).get("failed_batches", 0)) if kind == "lusifer" else 0
            if r["status"] != "ok":
                extra = {"fallback_from": kind, "fallback_reason": r["reason"], **(
                    {"lusifer": r["profile"]} if "profile" in r else {})}
                rows.append((u, "structured", kind, "fallback", r["reason"], fb, json.dumps({**st[u], **extra}),
                             structured_text(st[u], scale)))
            elif kind == "psych":
                rows.append((u, "psych", kind, "ok", "", 0, json.dumps(r["profile"]), psych_text(r["profile"])))
            else:
                p = r["profile"]
                rows.append((u, "lusifer", kind, "ok", "", fb, json.dumps(p),
                             (structured_text(st[u], scale) + " " + p["summary"]).strip()))
    return pd.DataFrame(rows, columns=PROFILE_COLUMNS)


def profile_report(df: pd.DataFrame, asked: str) -> dict:
    """What profiles.json says about how the profiles were built (counts, fallbacks, failed batches)."""
    fb = df[df["status"] == "fallback"] if "status" in df else df.iloc[:0]
    out = {"built": {k: int(v) for k, v in df["kind"].value_counts().items()}, "fallbacks": int(len(fb)),
           "fallback_reasons": {k: int(v) for k, v in fb["reason"].value_counts().items()}}
    if asked == "lusifer":
        batches = failed = 0
        reasons: dict[str, int] = {}
        for pj in df["profile_json"]:
            p = json.loads(pj)
            p = p.get("lusifer", p)
            batches += int(p.get("batches", 0))
            failed += int(p.get("failed_batches", 0))
            for k, v in (p.get("failed_reasons") or {}).items():
                reasons[k] = reasons.get(k, 0) + int(v)
        out.update({"lusifer_batches": batches, "lusifer_failed_batches": failed,
                    "lusifer_failed_batch_reasons": reasons,
                    "users_with_failed_batches": int((df["failed_batches"] > 0).sum())})
    return out


def profiles_dry_run(kind: str, train: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, scale: RatingScale,
                     last_n: int = 60, batch: int = 20) -> dict:
    """Requests and tokens LLM profiles would take if every call succeeded first time (nothing is sent)."""
    from rlsim.personas.prompts import messages_tokens

    st = structured_profiles(train, items, users, scale)
    if kind == "structured":
        return {"kind": kind, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "users": len(st)}
    labels = {int(r["item_id"]): movie_label(r) for r in items.to_dict("records")}
    placeholder = "x" * 700  # a previous summary of ~120 words
    req = p_tok = 0
    for u, g in train.groupby("user_id"):
        u = int(u)
        if u not in st:
            continue
        recent = g.sort_values("timestamp", kind="stable").tail(last_n)
        if kind == "psych":
            req += 1
            p_tok += messages_tokens(psych_messages(f"User {u}. " + structured_text(st[u], scale),
                                                    history_lines(recent, labels)))
            continue
        for s in range(0, len(recent), batch):
            req += 1
            p_tok += messages_tokens(summary_messages(placeholder if s else "",
                                                      history_lines(recent.iloc[s:s + batch], labels)))
    return {"kind": kind, "users": len(st), "requests": req, "prompt_tokens": p_tok}


def profiles_fingerprint(df: pd.DataFrame) -> str:
    """sha256 of the profile texts by user: what a rating job's identity records of its profiles."""
    import hashlib

    items = sorted(zip(df["user_id"].astype(int), df["text"].astype(str)))
    return hashlib.sha256(json.dumps(items).encode("utf-8")).hexdigest()


def save_profiles(df: pd.DataFrame, train: pd.DataFrame, out_dir) -> None:
    from pathlib import Path

    out = Path(out_dir)
    write_parquet(df, out / "profiles.parquet")
    write_parquet(train[train["user_id"].isin(df["user_id"])], out / "profile_ratings.parquet")


def read_profiles(path) -> tuple[pd.DataFrame, dict]:
    """(profiles table, profiles.json) from a folder written by `rlsim personas profile`."""
    from pathlib import Path

    from rlsim.errors import ConfigError
    from rlsim.io import read_json

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    f = folder / "profiles.parquet"
    if not f.is_file():
        raise RlsimError(f"no profiles at {f} (run `rlsim personas profile` first)")
    meta_p = folder / "profiles.json"
    if not meta_p.is_file():
        raise ConfigError(f"{folder} has no profiles.json, so the dataset and split its profiles were built on "
                          "are unknown; rebuild them with `rlsim personas profile`")
    return pd.read_parquet(f), read_json(meta_p)


def load_profile_texts(path) -> dict[int, str]:
    df, _ = read_profiles(path)
    return dict(zip(df["user_id"].astype(int), df["text"]))
