"""Dynamic users (Lusifer-style summaries) of the LLM persona simulator: every ``summary_every`` ratings
of a session the persona's summary is updated, and later prompts of that session carry it."""

from __future__ import annotations

import asyncio
import json

from rlsim.simulators.base import Session


class SessionSummaries:
    """Mixin of LLMPersonaSimulator (rlsim.simulators.llm): its summaries, memoised and cached."""

    def _summary_lines(self, items: tuple, ratings: tuple) -> list[str]:
        labels = self.builder.labels
        return [f"{labels.get(int(i), f'movie {int(i)}')}: {round(float(r), 1):g}" for i, r in zip(items, ratings)]

    async def summary_for(self, user: int, session: Session) -> str:
        """The persona's summary after the session's first floor(len / N) * N ratings ("" before N)."""
        N = self.cfg.summary_every
        k = (len(session) // N) * N if N else 0
        if k == 0:
            return ""
        return await self._summary_at(int(user), session.items[:k], session.ratings[:k])

    async def _summary_at(self, user: int, items: tuple, ratings: tuple) -> str:
        key = (user, tuple(int(i) for i in items), tuple(float(r) for r in ratings))
        if key in self._summaries:
            self._summaries.move_to_end(key)
            self.counts["summaries_memoised"] += 1
            return self._summaries[key]
        st = self._state()
        task = st._summary_tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(self._update_summary(user, key[1], key[2]))
            st._summary_tasks[key] = task
            task.add_done_callback(lambda _t, k=key, d=st._summary_tasks: d.pop(k, None))
        return await asyncio.shield(task)

    async def _update_summary(self, user: int, items: tuple, ratings: tuple) -> str:
        from rlsim.personas.prompts import SUMMARY_SCHEMA, summary_messages

        N = self.cfg.summary_every
        prev = await self._summary_at(user, items[:-N], ratings[:-N]) if len(items) > N else ""
        start = prev or self.builder.profiles.get(user, "")  # the first update starts from the profile
        msgs = summary_messages(start, self._summary_lines(items[-N:], ratings[-N:]))
        p = self.pcfg
        # The same request (and cache key) as RatingEngine.complete.
        params = {"temperature": p.temperature, "max_tokens": max(p.max_output_tokens, 600), "seed": p.seed}
        self.counts["summary_updates"] += 1
        why = "not attempted"
        answers = 0
        for attempt in range(p.max_retries + 1):
            res, exc, _ = await self.request(msgs, SUMMARY_SCHEMA, params, self.summary_usage, answers)
            if res is None:
                why, final = await self.after_error(exc, self.summary_usage, attempt)
                if final:
                    break
                continue
            answers += 1
            try:
                new = json.loads(res["text"])["summary"]
                why = "" if isinstance(new, str) and new.strip() else "empty_summary"
            except (json.JSONDecodeError, TypeError, KeyError):
                why = "malformed_json"
            if not why:
                self._summaries[(user, items, ratings)] = new.strip()
                while len(self._summaries) > self.cfg.max_summaries:
                    self._summaries.popitem(last=False)
                return new.strip()
        # Not memoised: a later prompt asks again; this one keeps the previous summary.
        self.counts["summary_failed"] += 1
        self.summary_failures[why] = self.summary_failures.get(why, 0) + 1
        return prev
