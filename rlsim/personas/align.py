"""AlignUSER-style alignment from demonstrations (``rlsim personas align``).

For each user, the most recent ``demos`` of their TRAINING ratings (minus a seeded per-user
validation slice, ``holdout_validation`` of the training ratings; test ratings are never touched)
are the demonstrations, in time order. The persona (profile + backend) then meets them in four kinds
of request, all through the rating engine (``RatingEngine.complete``: response cache, the cluster's
limiter, the job's budget ledger, retries):

1. next-state: the demonstrations in chunks of ``chunk``: given the ``history`` real ratings before
   the chunk (the session so far, so every earlier chunk's real ratings are revealed to it), predict
   the chunk's ratings;
2. pair choices: ``pair_questions`` pairs of demonstration movies the user rated differently: which
   did they rate higher?
3. what-if sessions: ``whatif`` times, a demonstration A with the ``session`` ratings before it, and
   another demonstration B the user rated differently: "had the session shown B instead of A, how
   would you have rated it?" (the truth: the user's real rating of B);
4. reflection: its errors (predicted vs real, per-genre bias, wrong pair choices, what-if errors)
   are shown to it and it writes at most ``max_lessons`` short lessons (JSON schema).

Requests per user: ceil(demos / chunk) + 3 (next-state chunks, pairs, what-ifs and reflection), each
answered once unless unusable. The lessons are written to OUT/lessons.parquet and OUT/lessons.json
(format, version, dataset, split and its fingerprint, backend/model, the prompts' hash, the
alignment settings) beside OUT/demonstrations.parquet (the user, item, rating and timestamp of every
rating the prompts showed); ``rate``/``evaluate`` take ``--lessons OUT`` and append them to the profile
line of every prompt ("Lessons from your own past ratings: (1) ..."), refusing lessons built on
another dataset or split. Fidelity before and after is measured on the validation slice of the
aligned users with the same rating prompts, without and with the lessons (OUT/before/job and
OUT/after/<lessons hash>/job: ordinary resumable rating jobs).

The offline persona is not an LLM: it has no lessons and alignment refuses it (nothing is faked).
A rerun into the same OUT resumes: users done (lessons written) or refused for good are final;
users stopped by the budget or a transient failure are aligned again (their answered steps come
back from the cache, an unusable answer is asked again, not replayed). ``--budget-usd`` caps the
whole run: the alignment requests and both measurement jobs together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.data.schema import RatingScale, genre_list
from rlsim.data.splits import Split, holdout_validation
from rlsim.errors import ConfigError
from rlsim.io import read_json, write_json, write_parquet
from rlsim.personas import prompts as P
from rlsim.personas.pool import completion_estimate, empty_usage, is_final, merge_usage
from rlsim.personas.validate import _load_json, parse_ratings

LESSONS_FORMAT = 1
ALIGN_FORMAT = 1
OFFLINE_REFUSAL = ("the offline persona is not an LLM and has no lessons: `personas align` needs an LLM backend "
                   "(--backend openai or tinytroupe, with an endpoint); alignment does not apply to offline")
OFFLINE_LESSONS = "the offline persona is not an LLM and reads no lessons; drop --lessons or use an LLM backend"
MAX_LESSON_CHARS = 200
MAX_SHOWN_ERRORS = 20  # wrong predictions listed in the reflection prompt (the largest errors)
PAIR_COMPLETION = 6  # tokens per pair choice ('"p1":"A",')
LESSON_COMPLETION = 40  # tokens per lesson
TRANSPORT = "transport"  # a step failed before any usable answer came back (budget, HTTP, timeout)


@dataclass
class AlignConfig:
    """YAML section ``align`` (flags win)."""

    demos: int = 30  # demonstrations per user: their most recent training ratings outside the validation slice
    chunk: int = 5  # next-state movies per request
    history: int = 8  # real ratings shown before each next-state chunk (the session so far)
    pair_questions: int = 6  # "which did you rate higher?" pairs, in one request
    whatif: int = 4  # "what if the session had shown B instead of A?" cases, in one request
    session: int = 3  # ratings shown before the replaced movie of a what-if session
    max_lessons: int = 3
    validation_frac: float = 0.2  # per-user share of the training ratings held out to measure before/after
    min_demos: int = 4  # users with fewer demonstrations are skipped (recorded)

    def validate(self) -> "AlignConfig":
        for name, lo in (("demos", 1), ("chunk", 1), ("history", 0), ("pair_questions", 0), ("whatif", 0),
                         ("session", 0), ("max_lessons", 1), ("min_demos", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"align: {name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        f = self.validation_frac
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
            raise ConfigError(f"align: validation-frac must be in (0, 1), got {f!r}")
        return self


# ---------------------------------------------------------------- lessons: storage, loading, prompts

def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def lessons_fingerprint(lessons: dict[int, list[str]]) -> str:
    return _sha(sorted((int(u), list(v)) for u, v in lessons.items()))


def apply_lessons(texts: dict[int, str], lessons: dict[int, list[str]]) -> tuple[dict[int, str], dict]:
    """Profile texts with each user's lessons appended on the profile line; info for the job's summary."""
    out = dict(texts)
    used = {}
    for u in texts:
        ls = lessons.get(int(u)) or []
        if ls:
            out[u] = P.profile_with_lessons(texts[u], ls)
            used[int(u)] = list(ls)
    return out, {"users_with_lessons": len(used), "users": len(texts), "sha256": lessons_fingerprint(used)}


def _lessons_dir(path) -> Path:
    p = Path(path)
    return p.parent if p.is_file() else p


def load_lessons(path, data_cfg, split) -> tuple[dict[int, list[str]], dict]:
    """Lessons from an align OUT folder (lessons.json + lessons.parquet), after checking they were built
    on this dataset and split and that no demonstration is a rating this split holds out."""
    from rlsim.personas.run import split_fingerprint

    d = _lessons_dir(path)
    mp = d / "lessons.json"
    if not mp.is_file():
        raise ConfigError(f"no lessons in {path} (lessons.json missing): run `rlsim personas align --out {path}`")
    meta = read_json(mp)
    if meta.get("format") != LESSONS_FORMAT:
        raise ConfigError(f"lessons in {path} have format {meta.get('format')} (this rlsim reads {LESSONS_FORMAT}); "
                          "align again")
    if meta.get("dataset") != data_cfg.dataset or meta.get("split") != split.name:
        raise ConfigError(f"lessons in {path} were built on {meta.get('dataset')} split {meta.get('split')}, this "
                          f"job uses {data_cfg.dataset} split {split.name}; align on the same split")
    if meta.get("split_fingerprint") != split_fingerprint(split):
        raise ConfigError(f"lessons in {path} were built on another '{split.name}' split of {data_cfg.dataset} "
                          "(other seed or test fraction); align on the same split")
    for name in ("lessons.parquet", "demonstrations.parquet"):
        if not (d / name).is_file():
            raise ConfigError(f"lessons in {path} are incomplete ({name} missing): align again")
    demos = pd.read_parquet(d / "demonstrations.parquet", columns=["user_id", "item_id"])
    leak = demos.merge(split.test[["user_id", "item_id"]], on=["user_id", "item_id"])
    if len(leak):
        raise ConfigError(f"lessons in {path} were learned from {len(leak)} ratings this split holds out; "
                          "align on the same split")
    df = pd.read_parquet(d / "lessons.parquet")
    lessons = {int(u): [str(t) for t in g.sort_values("lesson")["text"]] for u, g in df.groupby("user_id")}
    info = {"source": str(d), "version": meta.get("version"), "sha256": meta.get("lessons_sha256"),
            "backend": meta.get("backend"), "model": meta.get("model"), "users_with_lessons": len(lessons),
            "profiles_sha256": (meta.get("profiles") or {}).get("sha256"),
            "validation": meta.get("validation")}
    return lessons, info


# ---------------------------------------------------------------- planning: demonstrations and questions

def split_validation(train: pd.DataFrame, frac: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(demonstration pool, validation): a seeded per-user random slice of the training ratings."""
    pool, val = holdout_validation(train, frac, seed)
    return pool, val


def item_rows(items: pd.DataFrame) -> dict[int, dict]:
    out = {}
    for r in items[["item_id", "title", "year", "genres"]].to_dict("records"):
        y = r["year"]
        out[int(r["item_id"])] = {"item_id": int(r["item_id"]), "title": str(r["title"]),
                                  "year": None if pd.isna(y) else int(y), "genres": str(r["genres"])}
    return out


def _item(rows: dict[int, dict], i: int) -> dict:
    return rows.get(int(i), {"item_id": int(i), "title": f"movie {int(i)}", "year": None, "genres": ""})


def plan_user(u: int, seq: pd.DataFrame, acfg: AlignConfig, seed: int, rows: dict[int, dict]) -> dict | None:
    """The questions of one user: seq = their demonstration pool in time order (item_id, rating, timestamp)."""
    n = len(seq)
    demos_n = min(acfg.demos, n)
    if demos_n < acfg.min_demos:
        return None
    rng = np.random.default_rng([int(seed), int(u)])
    items = seq["item_id"].to_numpy().astype(int)
    ratings = seq["rating"].to_numpy().astype(float)
    start = n - demos_n
    label = {int(i): P.movie_label(_item(rows, i)) for i in items}
    chunks = []
    for j, s in enumerate(range(start, n, acfg.chunk)):
        e = min(n, s + acfg.chunk)
        h0 = max(0, s - acfg.history)
        chunks.append({"key": f"ns{j}", "history": [(int(items[t]), float(ratings[t])) for t in range(h0, s)],
                       "items": [int(items[t]) for t in range(s, e)],
                       "real": {int(items[t]): float(ratings[t]) for t in range(s, e)}})
    pos = list(range(start, n))
    cands = [(a, b) for x, a in enumerate(pos) for b in pos[x + 1:] if ratings[a] != ratings[b]]
    pairs = []
    if cands and acfg.pair_questions:
        pick = rng.permutation(len(cands))[: acfg.pair_questions]
        for k, c in enumerate(pick):
            a, b = cands[int(c)]
            if rng.random() < 0.5:
                a, b = b, a
            pairs.append({"key": f"p{k + 1}", "a": int(items[a]), "b": int(items[b]),
                          "ra": float(ratings[a]), "rb": float(ratings[b])})
    whatif = []
    used_instead: set[int] = set()
    if acfg.whatif:
        for t in rng.permutation(pos):
            if len(whatif) >= acfg.whatif:
                break
            t = int(t)
            window = set(range(max(0, t - acfg.session), t + 1))
            others = [b for b in pos if b not in window and int(items[b]) not in used_instead
                      and ratings[b] != ratings[t]]
            if not others:
                continue
            b = int(others[int(rng.integers(len(others)))])
            used_instead.add(int(items[b]))
            whatif.append({"session": [(int(items[s]), float(ratings[s])) for s in range(max(0, t - acfg.session), t)],
                           "shown": (int(items[t]), float(ratings[t])), "instead": int(items[b]),
                           "real": float(ratings[b])})
    shown = sorted({i for c in chunks for i, _ in c["history"]} | {i for c in chunks for i in c["items"]}
                   | {i for w in whatif for i, _ in w["session"]} | {w["shown"][0] for w in whatif})
    demo_set = set(int(items[t]) for t in pos)
    return {"user_id": int(u), "chunks": chunks, "pairs": pairs, "whatif": whatif, "label": label,
            "demo_items": [int(items[t]) for t in pos], "context_items": [i for i in shown if i not in demo_set]}


def demonstrations_frame(plans: dict[int, dict], pool: pd.DataFrame) -> pd.DataFrame:
    """Every rating an alignment prompt shows: the demonstrations and the earlier ratings shown as context."""
    rows = []
    for u, p in plans.items():
        in_pair = {x for q in p["pairs"] for x in (q["a"], q["b"])}
        in_whatif = {x for w in p["whatif"] for x in (w["shown"][0], w["instead"])}
        for pos, i in enumerate(p["demo_items"]):
            rows.append((u, i, "demonstration", pos, i in in_pair, i in in_whatif))
        for i in p["context_items"]:
            rows.append((u, i, "context", -1, False, False))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "role", "position", "in_pair", "in_whatif"])
    df = df.merge(pool[["user_id", "item_id", "rating", "timestamp"]], on=["user_id", "item_id"], how="left")
    return df[["user_id", "item_id", "rating", "timestamp", "role", "position", "in_pair", "in_whatif"]] \
        .sort_values(["user_id", "role", "position", "item_id"]).reset_index(drop=True)


# ---------------------------------------------------------------- the requests of one user

def _ns_messages(p: dict, profile: str, rows, scale) -> list[list[dict]]:
    return [P.next_state_messages(p["user_id"], profile, [(p["label"].get(i) or P.movie_label(_item(rows, i)), r)
                                                          for i, r in c["history"]],
                                  [_item(rows, i) for i in c["items"]], scale) for c in p["chunks"]]


def _pair_messages(p: dict, profile: str, rows, scale) -> list[dict]:
    return P.pair_messages(p["user_id"], profile, [(q["key"], _item(rows, q["a"]), _item(rows, q["b"]))
                                                   for q in p["pairs"]], scale)


def _whatif_messages(p: dict, profile: str, rows, scale) -> list[dict]:
    lab = lambda i: P.movie_label(_item(rows, i))  # noqa: E731
    cases = [{"session": [(lab(i), r) for i, r in w["session"]], "shown": (lab(w["shown"][0]), w["shown"][1]),
              "instead": _item(rows, w["instead"])} for w in p["whatif"]]
    return P.whatif_messages(p["user_id"], profile, cases, scale)


def _rating_parser(expected: list[int], scale: RatingScale):
    def parse(text: str):
        got = parse_ratings(text, expected, scale)
        why = "" if got.complete else ("malformed_json" if got.parse == "failed" else
                                       "invalid_value" if got.invalid else "missing_from_answer")
        return got.ratings, got.complete, why
    return parse


def _pair_parser(keys: list[str]):
    def parse(text: str):
        obj, _ = _load_json(text or "")
        if obj is None:
            return {}, False, "malformed_json"
        out = {}
        for k in keys:
            v = str(obj.get(k, "")).strip().upper()
            if v in ("A", "B"):
                out[k] = v
        return out, len(out) == len(keys), "" if len(out) == len(keys) else "missing_from_answer"
    return parse


def clean_lessons(raw, max_lessons: int) -> list[str]:
    out: list[str] = []
    for x in raw if isinstance(raw, list) else []:
        if not isinstance(x, str):
            continue
        t = " ".join(x.split())
        if len(t) > MAX_LESSON_CHARS:
            t = t[:MAX_LESSON_CHARS].rsplit(" ", 1)[0] + " ..."
        if t and t.lower() not in {o.lower() for o in out}:
            out.append(t)
    return out[:max_lessons]


def _lessons_parser(max_lessons: int):
    def parse(text: str):
        obj, _ = _load_json(text or "")
        raw = obj.get("lessons") if isinstance(obj, dict) else None
        if raw is None:
            try:
                raw = json.loads((text or "").strip())
            except (json.JSONDecodeError, ValueError):
                raw = None
        if not isinstance(raw, list):
            return [], False, "malformed_json"
        return clean_lessons(raw, max_lessons), True, ""
    return parse


async def _ask(engine, messages, rf, parse, usage, start: int, tries: int):
    """Ask until the answer parses completely: (value, reason, kind, index). An unusable answer is asked again
    under a new answer index (never replayed); a transport failure stops at once (kind TRANSPORT). The index
    returned is where a resume starts: the usable answer, or the next one to ask."""
    best: dict | list = {}
    idx, why = start, "not attempted"
    for _ in range(max(1, tries)):
        text, err = await engine.complete(messages, rf, usage=usage, answer_index=idx)
        if err:  # nothing answered at idx: a resume asks there
            return best, err, TRANSPORT, idx
        val, complete, why = parse(text)
        best = {**best, **val} if isinstance(val, dict) and isinstance(best, dict) else val
        if complete:  # idx holds the usable answer: a resume replays it from the cache
            return best, "", "", idx
        idx += 1
    return best, why, "answer", idx


def evidence_of(p: dict, ns: dict[int, float], pairs: dict[str, str], wi: dict[int, float], rows,
                scale: RatingScale) -> tuple[dict, list[dict]]:
    """What the reflection prompt shows, and one record per question (answers.parquet)."""
    recs = []
    lab = lambda i: P.movie_label(_item(rows, i))  # noqa: E731
    errs = []  # (item, guess, real)
    for c in p["chunks"]:
        for i in c["items"]:
            g = ns.get(i)
            recs.append({"step": "next_state", "key": c["key"], "item_id": i, "other_item_id": -1,
                         "real": c["real"][i], "guess": np.nan if g is None else g, "choice": "",
                         "correct": None if g is None else bool(g == c["real"][i])})
            if g is not None:
                errs.append((i, g, c["real"][i]))
    wrong_pairs, n_pairs = [], 0
    for q in p["pairs"]:
        ch = pairs.get(q["key"], "")
        right = "A" if q["ra"] > q["rb"] else "B"
        recs.append({"step": "pair", "key": q["key"], "item_id": q["a"], "other_item_id": q["b"],
                     "real": q["ra"] - q["rb"], "guess": np.nan, "choice": ch,
                     "correct": None if not ch else ch == right})
        if ch:
            n_pairs += 1
            if ch != right:
                a, b, ra, rb = (q["a"], q["b"], q["ra"], q["rb"]) if ch == "A" else (q["b"], q["a"], q["rb"], q["ra"])
                wrong_pairs.append((lab(a), lab(b), ra, rb))
    wrong_wi = []
    for w in p["whatif"]:
        g = wi.get(w["instead"])
        recs.append({"step": "whatif", "key": f"w{w['shown'][0]}", "item_id": w["instead"],
                     "other_item_id": w["shown"][0], "real": w["real"], "guess": np.nan if g is None else g,
                     "choice": "", "correct": None if g is None else bool(g == w["real"])})
        if g is not None:
            errs.append((w["instead"], g, w["real"]))
            if g != w["real"]:
                wrong_wi.append((lab(w["instead"]), lab(w["shown"][0]), g, w["real"]))
    ns_err = [(i, g, r) for c in p["chunks"] for i in c["items"] for g, r in [(ns.get(i), c["real"][i])]
              if g is not None]
    d = np.array([g - r for _, g, r in ns_err], float)
    wrong = sorted([e for e in ns_err if e[1] != e[2]], key=lambda e: -abs(e[1] - e[2]))[:MAX_SHOWN_ERRORS]
    order = {i: k for k, (i, _, _) in enumerate(ns_err)}
    wrong.sort(key=lambda e: order[e[0]])  # in time order
    by_genre: dict[str, list[float]] = {}
    for i, g, r in errs:
        for gen in genre_list(_item(rows, i)["genres"]):
            by_genre.setdefault(gen, []).append(g - r)
    genres = sorted(((k, float(np.mean(v)), len(v)) for k, v in by_genre.items() if len(v) >= 2),
                    key=lambda x: (-abs(x[1]), x[0]))[:5]
    ev = {"predictions": [(lab(i), g, r) for i, g, r in wrong], "n_predictions": int(len(d)),
          "exact": int(np.sum(d == 0)), "bias": float(d.mean()) if len(d) else 0.0,
          "mae": float(np.abs(d).mean()) if len(d) else 0.0, "genres": genres, "pairs": wrong_pairs,
          "n_pairs": n_pairs, "pairs_right": n_pairs - len(wrong_pairs), "whatif": wrong_wi}
    return ev, recs


async def align_user(engine, p: dict, profile: str, current: list[str], acfg: AlignConfig, tries: int,
                     scale: RatingScale, rows, sem: asyncio.Semaphore, start: dict[str, int]) -> dict:
    """One user's alignment: next-state chunks, pair choices and what-ifs (concurrently), then the reflection."""
    usage = empty_usage()
    u = p["user_id"]

    async def ask(key, msgs, rf, parse):
        async with sem:
            return key, await _ask(engine, msgs, rf, parse, usage, start.get(key, 0), tries)

    jobs = []
    if p["pairs"]:
        keys = [q["key"] for q in p["pairs"]]
        jobs.append(ask("pairs", _pair_messages(p, profile, rows, scale), P.pair_schema(keys), _pair_parser(keys)))
    if p["whatif"]:
        ids = [w["instead"] for w in p["whatif"]]
        jobs.append(ask("whatif", _whatif_messages(p, profile, rows, scale),
                        P.named_rating_schema("whatif_ratings", ids, scale), _rating_parser(ids, scale)))
    for c, msgs in zip(p["chunks"], _ns_messages(p, profile, rows, scale)):
        jobs.append(ask(c["key"], msgs, P.named_rating_schema("next_ratings", c["items"], scale),
                        _rating_parser(c["items"], scale)))
    got = dict(await asyncio.gather(*jobs))
    index = {k: v[3] for k, v in got.items()}
    steps = {k: {"reason": v[1], "kind": v[2]} for k, v in got.items() if v[1]}
    base = {"user_id": u, "usage": usage, "index": index, "steps": steps}
    transport = [v[1] for v in got.values() if v[2] == TRANSPORT]
    if transport:  # stopped by the budget or a failed request: align again on resume (answers are cached)
        why = "budget" if "budget" in transport else sorted(transport)[0]
        return {**base, "status": "failed", "reason": why, "lessons": [], "records": []}
    ns: dict[int, float] = {}
    for c in p["chunks"]:
        ns.update({int(k): float(v) for k, v in got[c["key"]][0].items()})
    pairs = got["pairs"][0] if "pairs" in got else {}
    wi = {int(k): float(v) for k, v in got["whatif"][0].items()} if "whatif" in got else {}
    ev, recs = evidence_of(p, ns, pairs, wi, rows, scale)
    if not ev["n_predictions"] and not ev["n_pairs"] and not wi:
        return {**base, "status": "failed", "reason": "no_usable_answer", "lessons": [], "records": recs}
    msgs = P.reflection_messages(u, profile, ev, acfg.max_lessons, scale, current or None)
    key, (lessons, why, kind, idx) = await ask("reflect", msgs, P.LESSONS_SCHEMA, _lessons_parser(acfg.max_lessons))
    index["reflect"] = idx
    if why:
        steps["reflect"] = {"reason": why, "kind": kind}
        return {**base, "status": "failed", "reason": why if kind == TRANSPORT else f"reflection_{why}",
                "lessons": [], "records": recs, "evidence": _ev_summary(ev)}
    return {**base, "status": "ok", "reason": "", "lessons": list(lessons), "records": recs,
            "evidence": _ev_summary(ev)}


def _ev_summary(ev: dict) -> dict:
    return {"n_predictions": ev["n_predictions"], "exact": ev["exact"], "bias": ev["bias"], "mae": ev["mae"],
            "n_pairs": ev["n_pairs"], "pairs_right": ev["pairs_right"], "whatif_wrong": len(ev["whatif"])}


# ---------------------------------------------------------------- the journal of an alignment run

class AlignJournal:
    """OUT/align/journal.jsonl: one line per finished user (status, lessons, answers, usage), flushed at once."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> tuple[dict[int, dict], dict, dict[int, int]]:
        """(latest entry per user, usage of every run, runs per user)."""
        latest: dict[int, dict] = {}
        runs: dict[int, int] = {}
        usage = empty_usage()
        if not self.path.is_file():
            return latest, usage, runs
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn by a kill
                u = int(e["user_id"])
                usage = merge_usage(usage, e.get("usage", {}))
                runs[u] = runs.get(u, 0) + 1
                latest[u] = e
        return latest, usage, runs

    def append(self, entry: dict) -> None:
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and self.path.stat().st_size > 0 and self.path.read_bytes()[-1:] != b"\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            if torn:
                fh.write("\n")
            fh.write(json.dumps(entry, default=_json_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o).__name__)


def user_is_final(e: dict) -> bool:
    return e["status"] in ("ok", "skipped") or (e["status"] == "failed" and is_final("failed", e["reason"]))


# ---------------------------------------------------------------- estimates (dry run)

def estimate_align(plans: dict[int, dict], profiles: dict[int, str], current: dict[int, list[str]],
                   acfg: AlignConfig, rows, scale: RatingScale, cfg) -> dict:
    """Requests, tokens and dollars of the alignment requests, every answer usable at the first try; the
    reflection is estimated at its largest (every prediction, pair and what-if wrong)."""
    from rlsim.personas.cost import cost_usd
    from rlsim.personas.prompts import messages_tokens

    req = p_tok = c_tok = 0
    for u, p in plans.items():
        prof = P.profile_with_lessons(profiles.get(u, "A movie viewer."), current.get(u, []))
        msgs = _ns_messages(p, prof, rows, scale)
        req += len(msgs)
        p_tok += sum(messages_tokens(m) for m in msgs)
        c_tok += sum(completion_estimate(len(c["items"])) for c in p["chunks"])
        if p["pairs"]:
            req += 1
            p_tok += messages_tokens(_pair_messages(p, prof, rows, scale))
            c_tok += 4 + PAIR_COMPLETION * len(p["pairs"])
        if p["whatif"]:
            req += 1
            p_tok += messages_tokens(_whatif_messages(p, prof, rows, scale))
            c_tok += completion_estimate(len(p["whatif"]))
        lo, hi = scale.min, scale.max
        worst = {i: (r + scale.step if r + scale.step <= hi else r - scale.step)
                 for c in p["chunks"] for i, r in c["real"].items()}
        wi = {w["instead"]: (w["real"] + scale.step if w["real"] + scale.step <= hi else
                             max(lo, w["real"] - scale.step)) for w in p["whatif"]}
        wrong = {q["key"]: ("B" if q["ra"] > q["rb"] else "A") for q in p["pairs"]}
        ev, _ = evidence_of(p, worst, wrong, wi, rows, scale)
        req += 1
        p_tok += messages_tokens(P.reflection_messages(u, prof, ev, acfg.max_lessons, scale, current.get(u) or None))
        c_tok += 8 + LESSON_COMPLETION * acfg.max_lessons
    n = max(1, len(plans))
    return {"users": len(plans), "requests": req, "prompt_tokens": p_tok, "completion_tokens": c_tok,
            "cost_usd": cost_usd(cfg.prices, cfg.model, p_tok, c_tok), "requests_per_user": req / n,
            "tokens_per_user": (p_tok + c_tok) / n}


# ---------------------------------------------------------------- metrics

def fidelity_subset(df: pd.DataFrame, scale: RatingScale, col: str) -> dict:
    """RMSE, MAE, exact, off_by_1, within_1, close match, per-user Spearman and the mean signed error."""
    from rlsim.personas.evaluate import fidelity_metrics

    if not len(df):
        return {"n": 0}
    m = fidelity_metrics(df[["user_id", "item_id", "rating", col]].rename(columns={col: "predicted"}), scale)
    out = {k: m[k] for k in ("n", "rmse", "mae", "exact", "off_by_1", "within_1", "close_match",
                             "spearman_per_user") if k in m}
    out["mean_signed_error"] = float(np.mean(df[col].to_numpy(float) - df["rating"].to_numpy(float)))
    return out


def _describe(counts: list[int]) -> dict:
    if not counts:
        return {"mean": None, "min": None, "max": None, "histogram": {}}
    c = np.asarray(counts, int)
    return {"mean": float(c.mean()), "min": int(c.min()), "max": int(c.max()),
            "histogram": {str(k): int(v) for k, v in zip(*np.unique(c, return_counts=True))}}


def per_user(usage: dict, n: int) -> dict:
    n = max(1, n)
    tok = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
    return {"requests": usage.get("requests", 0) / n, "cached_requests": usage.get("cached_requests", 0) / n,
            "prompt_tokens": usage.get("prompt_tokens", 0) / n,
            "completion_tokens": usage.get("completion_tokens", 0) / n, "tokens": tok / n,
            "cost_usd": usage.get("cost_usd", 0.0) / n}


# ---------------------------------------------------------------- the stage

def _ledger_spend(path: Path) -> float:
    from rlsim.personas.pool import SpendLedger

    return SpendLedger(path).read()


def _stage_spend(out: Path) -> dict[str, float]:
    after = sum(_ledger_spend(p) for p in sorted((out / "after").glob("*/job/spend.json")))
    return {"align": _ledger_spend(out / "align" / "spend.json"),
            "before": _ledger_spend(out / "before" / "job" / "spend.json"), "after": after}


def _cap(budget: float | None, spend: dict[str, float], stage: str) -> float | None:
    """A stage's budget: the run's cap minus what the other stages spent (each stage keeps its own ledger, so
    a stage's cap counts its own earlier spend once, in its ledger)."""
    if budget is None:
        return None
    return max(0.0, float(budget) - sum(v for k, v in spend.items() if k != stage))


def _engine(cfg, spec, cache_path, use_ray: bool, job: str, ledger: Path, spent_before: float, budget):
    from rlsim.personas.cache import ResponseCache
    from rlsim.personas.limiter import LOCAL_JOB, LocalLimiter, RateLimiter, RayLimiter, cluster_limiter, limiter_name
    from rlsim.personas.pool import RatingEngine

    ledger.parent.mkdir(parents=True, exist_ok=True)
    reg = None
    if use_ray:
        import ray

        handle = cluster_limiter(limiter_name(spec.base_url, spec.model))
        reg = ray.get(handle.register.remote(job, cfg.rpm, cfg.tpm, budget, spent_before, None,
                                             str(ledger.resolve())))
        limiter = RayLimiter(handle, job)
    else:
        rl = RateLimiter(cfg.rpm, cfg.tpm, budget)
        rl.register(LOCAL_JOB, cfg.rpm, cfg.tpm, budget, spent_before, lease_s=float("inf"), ledger=str(ledger))
        limiter = LocalLimiter(rl)
    return RatingEngine(spec, cfg, limiter, ResponseCache(cache_path) if cache_path else None), reg


def align_identity(spec, cfg, acfg: AlignConfig, data_cfg, split, users, profiles_sha: str,
                   current_sha: str | None) -> dict:
    from rlsim.personas.run import split_fingerprint

    return {"format": ALIGN_FORMAT, **spec.cache_identity(), "temperature": cfg.temperature,
            "max_output_tokens": cfg.max_output_tokens, "persona_seed": cfg.seed, "dataset": data_cfg.dataset,
            "split": split.name, "split_fingerprint": split_fingerprint(split), "seed": data_cfg.seed,
            "align": dataclasses.asdict(acfg), "prompts_sha256": P.align_prompts_sha256(),
            "profiles_sha256": profiles_sha, "previous_lessons_sha256": current_sha,
            "users_sha256": _sha([int(u) for u in users])}


def run_align(data_cfg, persona_cfg, align_cfg: AlignConfig, out, *, users=None, profiles=None, lessons=None,
              api_key=None, use_ray: bool = True, dry_run: bool = False, progress: bool = True) -> dict:
    """The align stage (``rlsim.personas.run.align_stage`` documents it)."""
    from rlsim.data import load_split
    from rlsim.personas.backends import check_backend
    from rlsim.personas.run import (_need_ray, _profiles_for_job, _rate_pairs, backend_spec, evaluable_users,
                                    response_cache_path, sample_users)

    cfg = persona_cfg.validate()
    acfg = align_cfg.validate()
    if cfg.backend == "offline":
        raise ConfigError(OFFLINE_REFUSAL)
    _need_ray(use_ray and not dry_run)
    spec = backend_spec(cfg, api_key)
    if not dry_run:
        check_backend(spec)
    out = Path(out)
    ds, split = load_split(data_cfg)
    scale = ds.scale
    chosen = sample_users(evaluable_users(split), users, data_cfg.seed)
    if not len(chosen):
        raise ConfigError("no users to align (none of the chosen users has training and held-out ratings)")
    pool_all, val_all = split_validation(split.train, acfg.validation_frac, data_cfg.seed)
    pool = pool_all[pool_all["user_id"].isin(chosen)].reset_index(drop=True)
    val = val_all[val_all["user_id"].isin(chosen)].reset_index(drop=True)
    # Prompts of this run (alignment and the before/after measurement) see the demonstration pool only.
    msplit = Split(split.name, pool_all, split.test)
    notes: list[str] = []
    current: dict[int, list[str]] = {}
    cinfo = None
    if lessons is not None:
        current, cinfo = load_lessons(lessons, data_cfg, split)
        d = pd.read_parquet(_lessons_dir(lessons) / "demonstrations.parquet", columns=["user_id", "item_id"])
        leak = d.merge(val[["user_id", "item_id"]], on=["user_id", "item_id"])
        if len(leak):
            raise ConfigError(f"lessons in {lessons} were learned from {len(leak)} ratings this run holds out for "
                              "validation; align with the same --validation-frac and --seed")
        current = {u: v for u, v in current.items() if u in set(int(x) for x in chosen)}
    texts, pinfo = _profiles_for_job(profiles, data_cfg, msplit, chosen, ds)
    if profiles is not None:
        pr = _lessons_dir(profiles)
        if (pr / "profile_ratings.parquet").is_file():
            used = pd.read_parquet(pr / "profile_ratings.parquet", columns=["user_id", "item_id"])
            n_in = len(used.merge(val[["user_id", "item_id"]], on=["user_id", "item_id"]))
            if n_in:
                notes.append(f"the profiles in {profiles} were built from all training ratings, {n_in} of them in "
                             "the validation slice: both before and after are measured with that profile, so their "
                             "difference is the lessons' effect but their levels are optimistic")
    align_texts = {u: P.profile_with_lessons(t, current.get(u, [])) for u, t in texts.items()}
    rows = item_rows(ds.items)
    seqs = {int(u): g.sort_values(["timestamp", "item_id"], kind="stable")
            for u, g in pool.groupby("user_id")}
    plans: dict[int, dict] = {}
    skipped: dict[int, str] = {}
    val_users = set(val["user_id"].astype(int))
    for u in chosen:
        u = int(u)
        p = plan_user(u, seqs[u], acfg, data_cfg.seed, rows) if u in seqs else None
        if p is None or u not in val_users:
            skipped[u] = "too_few_ratings" if p is None else "no_validation_ratings"
            continue
        plans[u] = p
    demos = demonstrations_frame(plans, pool)
    version = int(cinfo["version"] or 0) + 1 if cinfo else 1
    pvals = val[val["user_id"].isin(list(plans))]
    if dry_run:
        est = estimate_align(plans, texts, current, acfg, rows, scale, cfg)
        placeholder = {u: ["x" * (MAX_LESSON_CHARS - 20)] * acfg.max_lessons for u in plans}
        _, before = _rate_pairs(ds, msplit, data_cfg, cfg, pvals[["user_id", "item_id"]], out / "before" / "job",
                                profiles=profiles, api_key=api_key, use_ray=use_ray, dry_run=True, progress=False,
                                crash_marker=None, lessons=current or None)
        _, after = _rate_pairs(ds, msplit, data_cfg, cfg, pvals[["user_id", "item_id"]], out / "after" / "x",
                               profiles=profiles, api_key=api_key, use_ray=use_ray, dry_run=True, progress=False,
                               crash_marker=None, lessons=placeholder)
        total = {k: est[k] + before[k] + after[k] for k in ("requests", "prompt_tokens", "completion_tokens",
                                                             "cost_usd")}
        res = {"backend": cfg.backend, "model": cfg.model, "users": len(plans), "skipped_users": len(skipped),
               "align": est, "before": {k: before[k] for k in ("requests", "prompt_tokens", "completion_tokens",
                                                               "cost_usd", "pairs")},
               "after": {k: after[k] for k in ("requests", "prompt_tokens", "completion_tokens", "cost_usd",
                                               "pairs")},
               "total": total, "budget_usd": cfg.budget_usd, "price_known": before.get("price_known"),
               "token_counter": before.get("token_counter"),
               "note": "every answer usable at the first try; the reflection at its largest (every answer wrong); "
                       "the after-measurement with the longest lessons"
                       + ("; TinyTroupe wraps each request in its agent specification, so it sends far more"
                          if cfg.backend == "tinytroupe" else "")}
        write_json(out / "dry_run.json", res)
        return res

    # ------------------------------------------------------------ the alignment requests
    ident = align_identity(spec, cfg, acfg, data_cfg, split, chosen, pinfo["sha256"],
                           cinfo["sha256"] if cinfo else None)
    adir = out / "align"
    mpath = adir / "manifest.json"
    manifest = {"identity": ident, "resumed": 0, "created": time.time()}
    if mpath.is_file():
        old = read_json(mpath)
        if old.get("identity") != ident:
            o = old.get("identity") or {}
            keys = sorted(k for k in set(o) | set(ident) if o.get(k) != ident.get(k))
            raise ConfigError(f"{out} holds another alignment ({', '.join(keys)} differ); use a new --out folder")
        manifest = {**old, "resumed": int(old.get("resumed", 0)) + 1}
    write_json(mpath, manifest)
    journal = AlignJournal(adir / "journal.jsonl")
    latest, usage_before, runs = journal.load()
    for u, why in skipped.items():
        if u not in latest:
            e = {"user_id": u, "status": "skipped", "reason": why, "lessons": [], "records": [], "usage": empty_usage(),
                 "index": {}, "steps": {}}
            journal.append(e)
            latest[u] = e
    todo = [u for u in plans if u not in latest or not user_is_final(latest[u])]
    spend = _stage_spend(out)
    spent_align = max(float(usage_before["cost_usd"]), spend["align"])
    spend["align"] = spent_align
    usage_run = empty_usage()
    reg = None
    if todo:
        job = "align-" + _sha({"out": str(out.resolve()), "identity": ident})[:12]
        engine, reg = _engine(cfg, spec, response_cache_path(data_cfg, cfg), use_ray, job, adir / "spend.json",
                              spent_align, _cap(cfg.budget_usd, spend, "align"))
        if reg is not None and reg.get("stricter_elsewhere"):
            notes.append(f"another job on this cluster asked for stricter limits: {reg['rpm']:g} requests/min, "
                         f"{reg['tpm']:g} tokens/min")
        tries = cfg.max_retries + 1

        async def main():
            from tqdm import tqdm

            sem = asyncio.Semaphore(max(1, cfg.max_concurrency))
            # Users in flight: enough to keep the requests busy, few enough that a budget stop leaves users
            # aligned or not started rather than many half done (a user's reflection waits for its answers).
            users_sem = asyncio.Semaphore(max(1, cfg.max_concurrency // 2))
            bar = tqdm(total=len(todo), desc="aligning users", disable=not progress, unit="user")

            async def one(u):
                start = dict((latest.get(u) or {}).get("index") or {})
                try:
                    async with users_sem:
                        return await align_user(engine, plans[u], align_texts[u], current.get(u, []), acfg, tries,
                                                scale, rows, sem, start)
                except Exception as exc:  # noqa: BLE001 - one user's crash is recorded, never the whole run's
                    return {"user_id": u, "status": "failed", "reason": f"error: {type(exc).__name__}",
                            "lessons": [], "records": [], "usage": empty_usage(), "index": start, "steps": {}}

            try:
                for fut in asyncio.as_completed([one(u) for u in todo]):
                    e = await fut
                    journal.append(e)
                    latest[e["user_id"]] = e
                    usage_run.update(merge_usage(usage_run, e["usage"]))
                    bar.update(1)
            finally:
                bar.close()
                await engine.aclose()

        try:
            asyncio.run(main())
        finally:
            if reg is not None:
                engine.limiter.handle.unregister.remote(engine.limiter.job)
    _, usage_align, runs = journal.load()

    # ------------------------------------------------------------ lessons, demonstrations, answers
    entries = [latest[u] for u in sorted(latest) if u in plans or u in skipped]
    ok = {int(e["user_id"]): list(e["lessons"]) for e in entries if e["status"] == "ok"}
    lrows = [(u, version, j + 1, t) for u, ls in sorted(ok.items()) for j, t in enumerate(ls)]
    write_parquet(pd.DataFrame(lrows, columns=["user_id", "version", "lesson", "text"]).astype(
        {"user_id": "int64", "version": "int64", "lesson": "int64", "text": "object"}), out / "lessons.parquet")
    write_parquet(demos.assign(version=version), out / "demonstrations.parquet")
    recs = [{"user_id": int(e["user_id"]), **r} for e in entries for r in e.get("records", [])]
    answers = pd.DataFrame(recs, columns=["user_id", "step", "key", "item_id", "other_item_id", "real", "guess",
                                          "choice", "correct"])
    write_parquet(answers.astype({"correct": "object"}), out / "answers.parquet")
    urows = []
    for e in entries:
        us = e.get("usage") or {}
        ev = e.get("evidence") or {}
        urows.append({"user_id": int(e["user_id"]), "status": e["status"], "reason": e["reason"],
                      "lessons": len(e["lessons"]), "demonstrations": len(plans[e["user_id"]]["demo_items"])
                      if e["user_id"] in plans else 0, "runs": runs.get(int(e["user_id"]), 0),
                      "next_state_bias": ev.get("bias"), "next_state_mae": ev.get("mae"),
                      "pairs_right": ev.get("pairs_right"), "pairs": ev.get("n_pairs"),
                      "requests_last_run": us.get("requests", 0), "cost_usd_last_run": us.get("cost_usd", 0.0)})
    write_parquet(pd.DataFrame(urows), out / "align_users.parquet")
    lsha = lessons_fingerprint(ok)
    status = pd.Series([e["status"] for e in entries]).value_counts().to_dict() if entries else {}
    user_fail = pd.Series([e["reason"] for e in entries if e["status"] == "failed"]).value_counts().to_dict()
    step_fail: dict[str, dict[str, int]] = {}
    for e in entries:
        for k, s in (e.get("steps") or {}).items():
            step = "next_state" if k.startswith("ns") else k
            step_fail.setdefault(step, {})
            step_fail[step][s["reason"]] = step_fail[step].get(s["reason"], 0) + 1
    meta = {"format": LESSONS_FORMAT, "version": version,
            "parent": {k: cinfo[k] for k in ("source", "version", "sha256")} if cinfo else None,
            "dataset": data_cfg.dataset, "split": split.name, "split_fingerprint": ident["split_fingerprint"],
            "seed": data_cfg.seed, "validation": {"frac": acfg.validation_frac, "seed": data_cfg.seed,
                                                  "ratings": int(len(val))},
            "backend": cfg.backend, "model": cfg.model, "temperature": cfg.temperature,
            "prompts_sha256": ident["prompts_sha256"], "align": dataclasses.asdict(acfg),
            "profiles": pinfo, "users": {"chosen": int(len(chosen)), "aligned": len(ok),
                                         "failed": int(status.get("failed", 0)),
                                         "skipped": int(status.get("skipped", 0))},
            "lessons_sha256": lsha, "lessons": "lessons.parquet", "demonstrations": "demonstrations.parquet",
            "demonstrations_sha256": _sha(demos[["user_id", "item_id", "rating", "timestamp"]].to_numpy(
                float).tolist()), "created": time.time()}
    write_json(out / "lessons.json", meta)

    # ------------------------------------------------------------ before / after on the validation slice
    aligned = sorted(ok)
    vpairs = val[val["user_id"].isin(aligned)][["user_id", "item_id", "rating"]].reset_index(drop=True)
    before = after = pd.DataFrame(columns=["user_id", "item_id", "predicted", "status", "reason"])
    sb: dict = {}
    sa: dict = {}
    if len(vpairs):
        bpairs = val[val["user_id"].isin(list(plans))][["user_id", "item_id"]].reset_index(drop=True)
        spend = {**_stage_spend(out), "align": max(float(usage_align["cost_usd"]), _stage_spend(out)["align"])}
        before, sb = _rate_pairs(ds, msplit, data_cfg, dataclasses.replace(cfg, budget_usd=_cap(
            cfg.budget_usd, spend, "before")), bpairs, out / "before" / "job", profiles=profiles, api_key=api_key,
            use_ray=use_ray, dry_run=False, progress=progress, crash_marker=None, lessons=current or None)
        adir_after = out / "after" / lsha[:12] / "job"
        this_after = _ledger_spend(adir_after / "spend.json")
        spend = {**_stage_spend(out), "align": spend["align"]}
        spend = {**spend, "after": this_after, "other_after": spend["after"] - this_after}
        after, sa = _rate_pairs(ds, msplit, data_cfg, dataclasses.replace(cfg, budget_usd=_cap(
            cfg.budget_usd, spend, "after")), vpairs[["user_id", "item_id"]], adir_after,
            profiles=profiles, api_key=api_key, use_ray=use_ray, dry_run=False, progress=progress,
            crash_marker=None, lessons={u: current.get(u, []) for u in aligned} | ok)
        notes += [f"before: {n}" for n in sb.get("notes", []) if "run the same command" not in n]
        notes += [f"after: {n}" for n in sa.get("notes", []) if "run the same command" not in n]
    cmp = vpairs.merge(before[["user_id", "item_id", "predicted"]].rename(columns={"predicted": "before"}),
                       on=["user_id", "item_id"], how="left") \
        .merge(after[["user_id", "item_id", "predicted"]].rename(columns={"predicted": "after"}),
               on=["user_id", "item_id"], how="left")
    write_parquet(cmp, out / "validation.parquet")
    both = cmp.dropna(subset=["before", "after"])
    fb, fa = fidelity_subset(both, scale, "before"), fidelity_subset(both, scale, "after")
    delta = {k: fa[k] - fb[k] for k in fb if k != "n" and isinstance(fb.get(k), float) and isinstance(
        fa.get(k), float)}
    usage_b, usage_a = sb.get("usage", empty_usage()), sa.get("usage", empty_usage())
    transient = sorted(e["reason"] for e in entries if e["status"] == "failed" and not user_is_final(e))
    if transient:
        notes.append(f"{len(transient)} users were not aligned for a transient reason "
                     f"({', '.join(sorted(set(transient)))}); run the same command again to retry them")
    for name, s in (("before", sb), ("after", sa)):
        if s.get("retryable_failed"):
            notes.append(f"{s['retryable_failed']} validation pairs of the {name} measurement failed for a "
                         f"transient reason ({', '.join(sorted(s['failure_reasons']))}); run the same command again "
                         "to retry them")
    n_al = len(aligned)
    result = {
        "dataset": data_cfg.dataset, "split": split.name, "backend": cfg.backend, "model": cfg.model,
        "persona": "an LLM persona (profile + backend) at the configured endpoint",
        "users": {"chosen": int(len(chosen)), "aligned": n_al, "failed": int(status.get("failed", 0)),
                  "skipped": int(status.get("skipped", 0))},
        "lessons_version": version, "lessons_per_user": _describe([len(ok[u]) for u in aligned]),
        "validation": {"frac": acfg.validation_frac, "seed": data_cfg.seed, "pairs_of_aligned_users": int(len(vpairs)),
                       "rated_before_and_after": int(len(both))},
        "before": fb, "after": fa, "delta": delta,
        "align_answers": _answer_summary(answers),
        "usage": {"align": usage_align, "align_this_run": usage_run, "before": usage_b, "after": usage_a},
        "per_aligned_user": per_user(usage_align, n_al),
        "measurement_per_aligned_user": per_user(merge_usage(usage_b, usage_a), n_al),
        "spent_usd": sum(_stage_spend(out).values()), "budget_usd": cfg.budget_usd,
        "failures": {"users": {str(k): int(v) for k, v in user_fail.items()}, "steps": step_fail,
                     "before": sb.get("failure_reasons", {}), "after": sa.get("failure_reasons", {})},
        "resumed": manifest.get("resumed", 0), "settings": dataclasses.asdict(acfg),
        "lessons": str(out / "lessons.json"), "notes": notes}
    write_json(out / "metrics.json", result)
    return result


def _answer_summary(answers: pd.DataFrame) -> dict:
    """How the persona did on its own demonstrations (before it wrote lessons)."""
    out = {}
    for step in ("next_state", "whatif"):
        a = answers[(answers["step"] == step) & answers["guess"].notna()]
        d = a["guess"].to_numpy(float) - a["real"].to_numpy(float)
        out[step] = {"answered": int(len(a)), "asked": int((answers["step"] == step).sum()),
                     "mae": float(np.abs(d).mean()) if len(d) else None,
                     "mean_signed_error": float(d.mean()) if len(d) else None,
                     "exact": float(np.mean(d == 0)) if len(d) else None}
    pa = answers[(answers["step"] == "pair") & (answers["choice"] != "")]
    out["pairs"] = {"answered": int(len(pa)), "asked": int((answers["step"] == "pair").sum()),
                    "accuracy": float(pa["correct"].astype(bool).mean()) if len(pa) else None}
    return out
