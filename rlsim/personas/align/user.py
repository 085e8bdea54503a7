"""The requests of one user: next-state chunks, pair choices and what-ifs (concurrently), then the
reflection that writes the lessons. Each answer is parsed; an unusable one is asked again under a
new answer index (never replayed from the cache)."""

from __future__ import annotations

import asyncio
import json

from rlsim.data.schema import RatingScale
from rlsim.personas import prompts as P
from rlsim.personas.align.config import TRANSPORT, AlignConfig
from rlsim.personas.align.evidence import evidence_of, evidence_summary
from rlsim.personas.align.plan import ns_messages, pair_messages, whatif_messages
from rlsim.personas.lessons import clean_lessons
from rlsim.personas.usage import empty_usage
from rlsim.personas.validate import load_json, parse_ratings


def rating_parser(expected: list[int], scale: RatingScale):
    def parse(text: str):
        got = parse_ratings(text, expected, scale)
        why = "" if got.complete else ("malformed_json" if got.parse == "failed" else
                                       "invalid_value" if got.invalid else "missing_from_answer")
        return got.ratings, got.complete, why
    return parse


def pair_parser(keys: list[str]):
    def parse(text: str):
        obj, _ = load_json(text or "")
        if obj is None:
            return {}, False, "malformed_json"
        out = {}
        for k in keys:
            v = str(obj.get(k, "")).strip().upper()
            if v in ("A", "B"):
                out[k] = v
        return out, len(out) == len(keys), "" if len(out) == len(keys) else "missing_from_answer"
    return parse


def lessons_parser(max_lessons: int):
    def parse(text: str):
        obj, _ = load_json(text or "")
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


async def ask_until_usable(engine, messages, rf, parse, usage, start: int, tries: int):
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


async def align_user(engine, p: dict, profile: str, current: list[str], acfg: AlignConfig, tries: int,
                     scale: RatingScale, rows, sem: asyncio.Semaphore, start: dict[str, int]) -> dict:
    """One user's alignment: next-state chunks, pair choices and what-ifs (concurrently), then the reflection."""
    usage = empty_usage()
    u = p["user_id"]

    async def ask(key, msgs, rf, parse):
        async with sem:
            return key, await ask_until_usable(engine, msgs, rf, parse, usage, start.get(key, 0), tries)

    jobs = []
    if p["pairs"]:
        keys = [q["key"] for q in p["pairs"]]
        jobs.append(ask("pairs", pair_messages(p, profile, rows, scale), P.pair_schema(keys), pair_parser(keys)))
    if p["whatif"]:
        ids = [w["instead"] for w in p["whatif"]]
        jobs.append(ask("whatif", whatif_messages(p, profile, rows, scale),
                        P.named_rating_schema("whatif_ratings", ids, scale), rating_parser(ids, scale)))
    for c, msgs in zip(p["chunks"], ns_messages(p, profile, rows, scale)):
        jobs.append(ask(c["key"], msgs, P.named_rating_schema("next_ratings", c["items"], scale),
                        rating_parser(c["items"], scale)))
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
    key, (lessons, why, kind, idx) = await ask("reflect", msgs, P.LESSONS_SCHEMA, lessons_parser(acfg.max_lessons))
    index["reflect"] = idx
    if why:
        steps["reflect"] = {"reason": why, "kind": kind}
        return {**base, "status": "failed", "reason": why if kind == TRANSPORT else f"reflection_{why}",
                "lessons": [], "records": recs, "evidence": evidence_summary(ev)}
    return {**base, "status": "ok", "reason": "", "lessons": list(lessons), "records": recs,
            "evidence": evidence_summary(ev)}
