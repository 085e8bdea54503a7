"""Compact prompts and the JSON schema of a rating answer.

Budget: at most ~120 prompt tokens per rated movie. A batch shares one system prompt and one
profile; each movie costs a line with its title/genres plus a few of the user's own ratings.
"""

from __future__ import annotations

import functools
import json

from rlsim.data.schema import RatingScale

SYSTEM = ("You are a movie viewer described by the profile. Rate each listed movie as you would, "
          "using the rating scale. Answer only JSON mapping each movie id to your rating.")


def chars_tokens(text: str) -> int:
    """~4 characters per token (English): an estimate that never needs a tokenizer file."""
    return max(1, (len(text) + 3) // 4)


@functools.lru_cache(maxsize=1)
def _encoding():
    """tiktoken's o200k_base, looked up once per process: offline its download fails, and retrying it
    on every call blocked the event loop (TinyTroupe installs tiktoken)."""
    try:
        import tiktoken

        return tiktoken.get_encoding("o200k_base")
    except Exception:  # noqa: BLE001 - no tiktoken, or no encoding file offline
        return None


def estimate_tokens(text: str) -> int:
    """Token count: tiktoken when installed with its encoding, else ~4 characters per token (English)."""
    enc = _encoding()
    return len(enc.encode(text)) if enc is not None else chars_tokens(text)


def messages_tokens(messages: list[dict]) -> int:
    return sum(estimate_tokens(m["content"]) + 4 for m in messages) + 2


def scale_text(scale: RatingScale) -> str:
    step = "whole numbers" if float(scale.step).is_integer() else f"steps of {scale.step:g}"
    return f"{scale.min:g} (hated) to {scale.max:g} (loved), {step}"


def movie_label(item: dict) -> str:
    year = item.get("year")
    y = f" ({int(year)})" if year is not None and str(year) not in ("nan", "<NA>", "None") else ""
    title = str(item["title"])
    if y and title.endswith(y):
        y = ""
    genres = str(item.get("genres") or "").replace("|", "/")
    return f"{title}{y}" + (f" [{genres}]" if genres else "")


def rating_messages(user_id: int, profile_text: str, items: list[dict], grounding: dict[int, list[tuple[str, float]]],
                    scale: RatingScale) -> list[dict]:
    """Chat messages asking one persona to rate ``items`` (dicts with item_id,title,year,genres).

    grounding maps item_id -> [(label of a movie the user rated, rating)], shown once each.
    """
    shown: set[str] = set()
    lines = []
    for it in items:
        ctx = []
        for label, r in grounding.get(int(it["item_id"]), []):
            if label not in shown:
                shown.add(label)
                ctx.append(f"{label}={r:g}")
        line = f"{int(it['item_id'])}: {movie_label(it)}"
        if ctx:
            line += " | you rated similar: " + "; ".join(ctx)
        lines.append(line)
    user = (f"Profile of user {int(user_id)}: {profile_text}\nScale: {scale_text(scale)}.\nMovies to rate (id: title):\n"
            + "\n".join(lines))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


SESSION_INTRO = "In this session you were shown, in order: "


def session_text(session: list[tuple[str, float]], summary: str = "") -> str:
    """What a persona simulator adds to a rating prompt: its summary as it stands after this session's
    earlier ratings (Lusifer-style, updated every N ratings) and the session so far, each on one line."""
    lines = []
    if summary:
        lines.append("Your tastes as they stand now, updated during this session: " + " ".join(summary.split()))
    if session:
        shown = "; ".join(f"{' '.join(str(label).split())} — you rated {round(float(r), 1):g}" for label, r in session)
        lines.append(SESSION_INTRO + shown + ".")
    if lines:
        lines.append("Rate the movies above as you would now, after this session.")
    return "\n".join(lines)


def session_rating_messages(user_id: int, profile_text: str, items: list[dict],
                            grounding: dict[int, list[tuple[str, float]]], scale: RatingScale,
                            session: list[tuple[str, float]], summary: str = "") -> list[dict]:
    """``rating_messages`` with the session so far (and the persona's updated summary) after the movies."""
    msgs = rating_messages(user_id, profile_text, items, grounding, scale)
    extra = session_text(session, summary)
    if extra:
        msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + "\n" + extra}
    return msgs


def rating_schema(item_ids: list[int], scale: RatingScale) -> dict:
    """response_format json_schema: one required property per movie id, numbers on the scale."""
    typ = "integer" if float(scale.step).is_integer() and float(scale.min).is_integer() else "number"
    props = {str(int(i)): {"type": typ, "minimum": scale.min, "maximum": scale.max} for i in item_ids}
    return {"type": "json_schema", "json_schema": {"name": "ratings", "strict": True, "schema": {
        "type": "object", "properties": props, "required": list(props), "additionalProperties": False}}}


PSYCH_SCHEMA = {"type": "json_schema", "json_schema": {"name": "psych_profile", "strict": True, "schema": {
    "type": "object", "additionalProperties": False,
    "properties": {
        **{t: {"type": "string", "enum": ["low", "medium", "high"]} for t in (
            "openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism",
            "sensation_seeking", "empathy")},
        "cognitive_style": {"type": "string", "enum": ["structured narratives", "non-linear narratives", "both"]},
        "closure_vs_exploration": {"type": "string", "enum": ["need for closure", "exploration", "balanced"]},
        "preferred_genres": {"type": "array", "items": {"type": "string"}},
        "favourite_movies": {"type": "array", "items": {"type": "string"}},
        "disliked_movies": {"type": "array", "items": {"type": "string"}},
        "observations": {"type": "string"},
    },
    "required": ["openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism",
                 "sensation_seeking", "empathy", "cognitive_style", "closure_vs_exploration",
                 "preferred_genres", "favourite_movies", "disliked_movies", "observations"],
}}}

SUMMARY_SCHEMA = {"type": "json_schema", "json_schema": {"name": "summary", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "properties": {"summary": {"type": "string"}},
    "required": ["summary"]}}}


def psych_messages(structured_text: str, history_lines: list[str]) -> list[dict]:
    return [{"role": "system", "content": "You are a psychologist profiling a movie viewer from their ratings. "
             "Answer JSON with Big Five traits (low/medium/high), sensation seeking, empathy, cognitive style, "
             "need for closure vs exploration, preferred genres, favourite and disliked movies, observations."},
            {"role": "user", "content": structured_text + "\nRatings:\n" + "\n".join(history_lines)}]


def summary_messages(previous: str, batch_lines: list[str]) -> list[dict]:
    return [{"role": "system", "content": "You maintain a concise summary (under 120 words) of a movie viewer's "
             "tastes. Update it with the new ratings; answer JSON {\"summary\": ...}."},
            {"role": "user", "content": f"Current summary: {previous or '(none yet)'}\nNew ratings:\n"
             + "\n".join(batch_lines)}]


def dumps_compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
