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


# ---------------------------------------------------------------- alignment from demonstrations (personas align)
#
# The persona meets its user's own demonstrations (training ratings in time order) in four kinds of
# request, each under a JSON schema: next-state (predict the next movies' ratings given the session so
# far), pair choices (which of two movies rated differently was rated higher), what-if sessions (a
# movie of the session replaced by another: its rating then), and a reflection on its errors that
# writes at most L short lessons. Lessons then ride on the profile line of every later prompt.
# Movie lines to rate are "<id>: <title>"; no other line starts with digits and a colon.

ALIGN_SYSTEM = ("You are a movie viewer described by the profile, studying your own past ratings so that you "
                "rate like yourself. Answer only the JSON object asked for.")
REFLECT_SYSTEM = ("You are a movie viewer described by the profile. You compare your guesses about your own "
                  "ratings with what you really rated, and write short lessons for your future ratings. "
                  "Answer only the JSON object asked for.")
LESSONS_PREFIX = "Lessons from your own past ratings:"


def lessons_text(lessons: list[str]) -> str:
    """The lessons as they enter a prompt: one line after the profile ('' when there are none)."""
    items = [" ".join(str(x).split()) for x in lessons if str(x).strip()]
    if not items:
        return ""
    return f"{LESSONS_PREFIX} " + " ".join(f"({j + 1}) {t}" for j, t in enumerate(items))


def profile_with_lessons(profile_text: str, lessons: list[str]) -> str:
    """Profile text followed by the lessons, on one line (TinyTroupe reads the profile line)."""
    extra = lessons_text(lessons)
    return f"{profile_text} {extra}".strip() if extra else profile_text


def _head(user_id: int, profile_text: str, scale: RatingScale) -> str:
    return f"Profile of user {int(user_id)}: {profile_text}\nScale: {scale_text(scale)}."


def _rated(label: str, r: float) -> str:
    return f"- {label} = {r:g}"


def next_state_messages(user_id: int, profile_text: str, history: list[tuple[str, float]], items: list[dict],
                        scale: RatingScale) -> list[dict]:
    """Next-state task: the session so far (real ratings, oldest first), then the next movies to predict."""
    hist = "\n".join(_rated(label, r) for label, r in history) or "- (nothing yet)"
    lines = "\n".join(f"{int(it['item_id'])}: {movie_label(it)}" for it in items)
    user = (_head(user_id, profile_text, scale) + "\nYour ratings so far in this session, oldest first:\n" + hist
            + "\nNext you watched these movies (id: title). Predict the rating you gave each one:\n" + lines)
    return [{"role": "system", "content": ALIGN_SYSTEM}, {"role": "user", "content": user}]


def named_rating_schema(name: str, item_ids: list[int], scale: RatingScale) -> dict:
    """``rating_schema`` under another name (next_ratings, whatif_ratings): id -> rating on the scale."""
    rf = rating_schema(item_ids, scale)
    return {"type": rf["type"], "json_schema": {**rf["json_schema"], "name": name}}


def pair_messages(user_id: int, profile_text: str, pairs: list[tuple[str, dict, dict]],
                  scale: RatingScale) -> list[dict]:
    """Pairs of the user's movies rated differently: which one did they rate higher? pairs: (key, item A, item B)."""
    lines = "\n".join(f"{k}) A: {movie_label(a)} (id {int(a['item_id'])}) | B: {movie_label(b)} "
                      f"(id {int(b['item_id'])})" for k, a, b in pairs)
    user = (_head(user_id, profile_text, scale) + "\nYou rated both movies of each pair, and not the same. "
            "Which did you rate higher? Answer A or B for each pair:\n" + lines)
    return [{"role": "system", "content": ALIGN_SYSTEM}, {"role": "user", "content": user}]


def pair_schema(keys: list[str]) -> dict:
    props = {k: {"type": "string", "enum": ["A", "B"]} for k in keys}
    return {"type": "json_schema", "json_schema": {"name": "pair_choices", "strict": True, "schema": {
        "type": "object", "properties": props, "required": list(props), "additionalProperties": False}}}


def whatif_messages(user_id: int, profile_text: str, cases: list[dict], scale: RatingScale) -> list[dict]:
    """What-if sessions: each case is {"session": [(label, rating)], "shown": (label, rating), "instead": item}:
    the session had shown ``instead`` in place of ``shown``; how would the user have rated it?"""
    blocks = []
    for j, c in enumerate(cases):
        before = "; ".join(f"{label} = {r:g}" for label, r in c["session"]) or "nothing"
        label, r = c["shown"]
        it = c["instead"]
        blocks.append(f"Session {j + 1}: you had rated {before}; then it showed {label} and you rated it {r:g}. "
                      f"What if it had shown this movie instead?\n{int(it['item_id'])}: {movie_label(it)}")
    user = (_head(user_id, profile_text, scale) + "\nWhat-if sessions: in each, one movie you were shown is "
            "replaced by another (id: title). Rate each replacement as you would have in that session.\n"
            + "\n".join(blocks))
    return [{"role": "system", "content": ALIGN_SYSTEM}, {"role": "user", "content": user}]


def reflection_messages(user_id: int, profile_text: str, evidence: dict, max_lessons: int, scale: RatingScale,
                        current: list[str] | None = None) -> list[dict]:
    """The persona is shown its errors and writes at most ``max_lessons`` lessons.

    evidence: {"predictions": [(label, guess, real)], "n_predictions", "exact", "bias" (mean guess - real),
    "mae", "genres": [(genre, mean guess - real, n)], "pairs": [(chosen label, other label, real chosen,
    real other)] (the wrong choices), "n_pairs", "pairs_right", "whatif": [(instead label, shown label, guess,
    real)]}.
    """
    e = evidence
    parts = [_head(user_id, profile_text, scale),
             "You tried to predict your own ratings. Here is how your guesses compared with what you really rated."]
    if e.get("n_predictions"):
        parts.append(f"Rating predictions: {e['exact']} of {e['n_predictions']} exactly right; mean of guess minus "
                     f"real {e['bias']:+.2f}; mean absolute error {e['mae']:.2f}. The ones you got wrong:")
        parts += [f"- {label}: you guessed {g:g}, you really rated {r:g}" for label, g, r in e["predictions"]] \
            or ["- (none)"]
    if e.get("genres"):
        parts.append("By genre (mean of guess minus real): "
                     + "; ".join(f"{g} {d:+.1f} (n={n})" for g, d, n in e["genres"]) + ".")
    if e.get("n_pairs"):
        parts.append(f"Which of two movies you rated higher: {e['pairs_right']} of {e['n_pairs']} right. "
                     "The ones you got wrong:")
        parts += [f"- you chose {a} over {b}; really {a} = {ra:g}, {b} = {rb:g}" for a, b, ra, rb in e["pairs"]] \
            or ["- (none)"]
    if e.get("whatif"):
        parts.append("What-if sessions (a movie replaced by another):")
        parts += [f"- {b} instead of {a}: you guessed {g:g}, you really rated {r:g}" for b, a, g, r in e["whatif"]]
    if current:
        parts.append("Lessons you already use: " + " ".join(f"({j + 1}) {t}" for j, t in enumerate(current))
                     + " Keep those that still hold; fix or drop the others.")
    parts.append(f"Write at most {int(max_lessons)} short lessons (one sentence each, first person, under 25 words) "
                 "about how you really rate that would have made your guesses right: general tendencies (genres, "
                 "kinds of films, how high or low you rate), not single movies. Answer JSON "
                 '{"lessons": ["...", ...]}.')
    return [{"role": "system", "content": REFLECT_SYSTEM}, {"role": "user", "content": "\n".join(parts)}]


LESSONS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "lessons", "strict": True, "schema": {
    "type": "object", "additionalProperties": False,
    "properties": {"lessons": {"type": "array", "items": {"type": "string"}}}, "required": ["lessons"]}}}


def rating_prompts_sha256() -> str:
    """A hash of the rating prompts (with and without a session) and their schema as rendered on fixed
    inputs: it changes whenever a template does, so a rating job's resume identity sees the change."""
    import hashlib

    sc = RatingScale(1.0, 5.0, 1.0)
    it = {"item_id": 1, "title": "A", "year": 2000, "genres": "Drama"}
    blob = json.dumps([rating_messages(1, "p", [it], {1: [("B", 4.0)]}, sc),
                       session_rating_messages(1, "p", [it], {}, sc, [("B", 4.0)], "s"),
                       rating_schema([1], sc), rating_schema([1], RatingScale(0.5, 5.0, 0.5))], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def align_prompts_sha256() -> str:
    """A hash of the alignment prompts as rendered on fixed inputs: it changes whenever a template does."""
    import hashlib

    sc = RatingScale(1.0, 5.0, 1.0)
    it = {"item_id": 1, "title": "A", "year": 2000, "genres": "Drama"}
    ev = {"predictions": [("A", 3.0, 4.0)], "n_predictions": 1, "exact": 0, "bias": -1.0, "mae": 1.0,
          "genres": [("Drama", -1.0, 1)], "pairs": [("A", "B", 2.0, 4.0)], "n_pairs": 1, "pairs_right": 0,
          "whatif": [("B", "A", 3.0, 4.0)]}
    blob = json.dumps([ALIGN_SYSTEM, REFLECT_SYSTEM, LESSONS_PREFIX, LESSONS_SCHEMA,
                       next_state_messages(1, "p", [("B", 4.0)], [it], sc),
                       pair_messages(1, "p", [("p1", it, it)], sc), pair_schema(["p1"]),
                       whatif_messages(1, "p", [{"session": [("B", 4.0)], "shown": ("C", 2.0), "instead": it}], sc),
                       reflection_messages(1, "p", ev, 3, sc, ["x"]), lessons_text(["x", "y"]),
                       named_rating_schema("next_ratings", [1], sc)], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- page choice (rlsim.simulators.llm_choice)
CHOICE_SYSTEM = ("You are a movie viewer described by the profile, browsing a page of recommended movies. For each "
                 "movie on the page say whether you would watch it now. Answer only JSON mapping each movie id to "
                 '"yes" or "no".')
WATCH_VALUES = ("yes", "no")


def page_choice_messages(user_id: int, profile_text: str, items: list[dict], session: list[tuple[str, float]],
                         summary: str = "") -> list[dict]:
    """Agent4Rec's page: the profile, the session so far (and the persona's updated summary), then a page
    of movies (dicts with item_id,title,year,genres), each to be answered "would you watch it now"."""
    lines = [f"Profile of user {int(user_id)}: {profile_text}"]
    if summary:
        lines.append("Your tastes as they stand now, updated during this session: " + " ".join(summary.split()))
    if session:
        lines.append(SESSION_INTRO + "; ".join(f"{' '.join(str(label).split())} — you rated {round(float(r), 1):g}"
                                               for label, r in session) + ".")
    lines.append("A page of recommended movies (id: title):")
    lines += [f"{int(it['item_id'])}: {movie_label(it)}" for it in items]
    lines.append("Would you watch each of them now? Answer yes or no for every movie.")
    return [{"role": "system", "content": CHOICE_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def page_choice_schema(item_ids: list[int]) -> dict:
    """response_format json_schema: one required property per movie id, "yes" or "no"."""
    props = {str(int(i)): {"type": "string", "enum": list(WATCH_VALUES)} for i in item_ids}
    return {"type": "json_schema", "json_schema": {"name": "page_choice", "strict": True, "schema": {
        "type": "object", "properties": props, "required": list(props), "additionalProperties": False}}}
