"""Would an LLM persona watch this movie now? Agent4Rec's page, asked through the persona simulator.

For one (user, session) the persona is shown ONE prompt (``page_choice_messages``): its profile, the
session so far (and its updated summary), then a page of movies, and answers per movie "would you
watch it now: yes or no" in a JSON schema ({"<id>": "yes" | "no"}). A page holds the movies asked
for that user and session in one call, sorted by id and cut into pages of ``page_size`` (default
4, as Agent4Rec's), so the answer does not depend on the order they were asked in. A movie the
session already showed is not picked again (p = 0, not asked: ``rlsim.simulators.choice.not_shown``).

P(watch), and ``method`` says how it was obtained (``choice_method``; auto tries them in order):
``logprobs``: at each answer's token, the alternatives that spell "yes" or "no", renormalised over
the two; ``samples``: ``n`` completions at ``sample_temperature``, the share of yes smoothed by
``smoothing`` pseudo-counts split between yes and no; ``answer``: the plain answer, yes -> 1 -
``choice_epsilon``, no -> ``choice_epsilon``. An endpoint that ignores logprobs (or n) moves auto to
the next method for good; a token carrying one of yes/no only (a point mass) asks that page again
by samples, else its answer is read plainly.

Every request goes through the simulator's gate (limiter + budget, worst-case reservation), its
response cache (the key holds the messages) and counts in its usage under "choice" (one extra
request per page). A movie that could not be answered is NaN with a reason (budget, http_500,
malformed_json, ...), never a guess; requested == answered + failed always.
"""

from __future__ import annotations

import asyncio
import collections
import re

import numpy as np

from rlsim.simulators.base import EMPTY, Session, Sessions, check_sessions
from rlsim.simulators.llm_logprobs import watch_probabilities

ORDER = ("logprobs", "samples", "answer")
WATCH = re.compile(r'"?(\d+)"?\s*:\s*"?(yes|no)\b', re.I)
MAX_PAGES = 100_000  # answered pages kept in memory (least recently used dropped)


def parse_watch(text: str, page: list[int]) -> dict[int, bool]:
    """{item: watched} of one answer (the page's ids only; the first answer of an id counts)."""
    want, out = set(page), {}
    for m in WATCH.finditer(text or ""):
        i = int(m.group(1))
        if i in want and i not in out:
            out[i] = m.group(2).lower() == "yes"
    return out


class LLMPageChoice:
    """The LLM persona simulator's choice model (``probability`` / ``aprobability_with_reasons``)."""

    name = "llm_page"
    conditions_on_session = True

    def __init__(self, sim):
        from rlsim.personas.usage import empty_usage

        self.sim = sim
        self.cfg = sim.cfg
        self._method: str | None = None if self.cfg.choice_method == "auto" else self.cfg.choice_method
        self.usage = empty_usage()
        self.counts = {"requested": 0, "answered": 0, "failed": 0, "not_shown": 0, "from_cache": 0,
                       "from_memo": 0, "pages": 0}
        self.failed_by_reason: dict[str, int] = {}
        self.answered_by_method: dict[str, int] = {}
        self._pages: collections.OrderedDict = collections.OrderedDict()

    @property
    def method(self) -> str:
        return "auto (not asked yet)" if self._method is None else self._method

    # ------------------------------------------------------------------ the contract's choice
    def probability(self, users, items, sessions: Sessions = None) -> np.ndarray:
        return self.probability_with_reasons(users, items, sessions)[0]

    def probability_with_reasons(self, users, items, sessions: Sessions = None) -> tuple[np.ndarray, list[str]]:
        async def run():
            try:
                return await self.aprobability_with_reasons(users, items, sessions)
            finally:
                await self.sim.engine.aclose()

        return asyncio.run(run())

    async def aprobability_with_reasons(self, users, items, sessions: Sessions = None
                                        ) -> tuple[np.ndarray, list[str]]:
        """[n] P(watch it now) and each pair's failure reason ("" when answered; NaN where failed)."""
        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        n = len(users)
        check_sessions(sessions, n)
        out, why = np.full(n, np.nan), [""] * n
        self.counts["requested"] += n
        groups: dict[tuple, dict[int, list[int]]] = {}
        for j in range(n):
            s = EMPTY if sessions is None or sessions[j] is None else sessions[j]
            if int(items[j]) in s.items:  # shown already in this session: not picked again, not asked
                out[j] = 0.0
                self.counts["not_shown"] += 1
                self.counts["answered"] += 1
                continue
            key = (int(users[j]), tuple(int(x) for x in s.items), tuple(float(x) for x in s.ratings))
            groups.setdefault(key, {}).setdefault(int(items[j]), []).append(j)
        b = self.cfg.page_size
        jobs = []
        for key, by_item in groups.items():
            ids = sorted(by_item)  # pages by id: the answer does not depend on the order asked
            jobs += [(key, ids[s:s + b]) for s in range(0, len(ids), b)]
        results = await asyncio.gather(*[self._page(key, page) for key, page in jobs])
        for (key, _), res in zip(jobs, results):
            for i, (p, reason, hit, how) in res.items():
                rows = groups[key][i]
                if p is None:
                    self.counts["failed"] += len(rows)
                    self.failed_by_reason[reason] = self.failed_by_reason.get(reason, 0) + len(rows)
                    for r in rows:
                        why[r] = reason
                    continue
                out[rows] = p
                self.counts["answered"] += len(rows)
                self.counts["from_cache"] += len(rows) if hit == "cache" else 0
                self.counts["from_memo"] += len(rows) if hit == "memo" else 0
                self.answered_by_method[how] = self.answered_by_method.get(how, 0) + len(rows)
        return out, why

    # ------------------------------------------------------------------ one page
    async def _page(self, key: tuple, page: list[int]) -> dict[int, tuple]:
        """{item: (P(watch) | None, failure reason, "cache" | "memo" | "", method)} of one page."""
        pk = (key, tuple(page))
        if pk in self._pages:
            self._pages.move_to_end(pk)
            return {i: (p, "", "memo", how) for i, (p, how) in self._pages[pk].items()}
        self.counts["pages"] += 1
        from rlsim.personas.prompts import page_choice_messages, page_choice_schema

        user, s_items, s_ratings = key
        session = Session(s_items, s_ratings)
        summary = await self.sim.summary_for(user, session) if self.cfg.summary_every else ""
        b = self.sim.builder
        shown = []
        if self.cfg.session_max and len(session):
            last = session.last(self.cfg.session_max)
            shown = [(b.labels.get(int(i), f"movie {int(i)}"), float(r)) for i, r in zip(last.items, last.ratings)]
        movies = [b.item_rows.get(i, {"item_id": i, "title": f"movie {i}", "year": None, "genres": ""}) for i in page]
        msgs = page_choice_messages(user, b.profiles.get(int(user), "A movie viewer."), movies, shown, summary)
        rf = page_choice_schema(page)
        got: dict[int, tuple] = {}
        plain: dict[int, bool] = {}  # answers read at a point-mass token, for the last fallback
        method = self._method or ORDER[0]
        todo = list(page)
        while todo:
            if method == "answer" and all(i in plain for i in todo):
                res, reason, hit = {"choices": [""]}, "", ""  # the plain answers are read already
            else:
                res, reason, hit = await self._send(msgs, rf, method, todo)
            if res is None:
                for i in todo:
                    got[i] = (None, reason, "", method)
                break
            nxt = ORDER[ORDER.index(method) + 1] if method != "answer" else None
            first = parse_watch((res.get("choices") or [res.get("text", "")])[0], page)
            if method == "logprobs":
                lps = (res.get("logprobs") or [None])[0]
                probs, gaps = watch_probabilities(lps, [i for i in todo if i in first]) if lps else ({}, {})
                if not lps and self.cfg.choice_method == "auto":
                    self._method = nxt  # the endpoint ignores logprobs: never ask them again
                for i, p in probs.items():
                    got[i] = (float(p), "", hit, method)
                plain.update({i: first[i] for i in todo if i in first and i not in probs})
            elif method == "samples":
                texts = res.get("choices") or [res.get("text", "")]
                if len(texts) < min(2, self.cfg.samples):  # n ignored: one answer is no share
                    if self.cfg.choice_method == "auto":
                        self._method = nxt
                    if plain:  # the answers already read are the plain answer: no new request
                        method, todo = "answer", [i for i in todo if i in plain]
                        continue
                else:
                    s = self.cfg.smoothing
                    for i in todo:
                        votes = [w[i] for w in (parse_watch(t, page) for t in texts) if i in w]
                        if votes:
                            got[i] = ((sum(votes) + s / 2) / (len(votes) + s), "", hit, method)
            else:
                eps = self.cfg.choice_epsilon
                for i in todo:
                    w = plain.get(i, first.get(i))
                    if w is not None:
                        got[i] = (1 - eps if w else eps, "", hit, method)
            if self._method is None and any(v[3] == method and v[0] is not None for v in got.values()):
                self._method = method  # auto: this endpoint answers by it
            todo = [i for i in todo if i not in got]
            if nxt is None:
                break
            method = nxt
        for i in page:
            got.setdefault(i, (None, "missing_from_answer", "", method))
        if all(v[0] is not None for v in got.values()):
            self._pages[pk] = {i: (v[0], v[3]) for i, v in got.items()}
            while len(self._pages) > MAX_PAGES:
                self._pages.popitem(last=False)
        return got

    async def _send(self, msgs: list[dict], rf: dict, method: str, todo: list[int]) -> tuple[dict | None, str, str]:
        """One usable answer to the page by ``method`` (retried on transient errors and answers missing a
        movie): (answer, "", "cache" | ""), or (None, reason, "")."""
        params = self.sim.params_for("answer" if method == "answer" else method)
        reason = "not attempted"
        answers = 0  # the n-th answer to the same page has its own cache key (a rerun replays them)
        for attempt in range(self.sim.pcfg.max_retries + 1):
            res, exc, hit = await self.sim.request(msgs, rf, params, self.usage, answers)
            if res is None:
                reason, final = await self.sim.after_error(exc, self.usage, attempt)
                if final:
                    break
                continue
            answers += 1
            first = parse_watch((res.get("choices") or [res.get("text", "")])[0], todo)
            if len(first) == len(todo):
                return res, "", "cache" if hit else ""
            reason = "malformed_json" if not first else "missing_from_answer"
            self.usage["errors"][reason] = self.usage["errors"].get(reason, 0) + 1
        return None, reason, ""

    def stats(self) -> dict:
        return {**self.counts, "method": self.method, "failed_by_reason": dict(self.failed_by_reason),
                "answered_by_method": dict(self.answered_by_method)}
