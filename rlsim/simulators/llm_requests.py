"""One prompt of the LLM persona simulator: a request through the gate (limiter + budget) and the
response cache, its errors, and a prompt's ratings read as distributions (rlsim.simulators.llm)."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from rlsim.simulators.base import Session
from rlsim.simulators.llm_config import LOGPROB_GAPS
from rlsim.simulators.llm_logprobs import logprob_distributions


class GatedRequests:
    """Mixin of LLMPersonaSimulator: every request it sends (ratings, summaries, the probe, page choices)."""

    def _state(self):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._sem = asyncio.Semaphore(max(1, self.pcfg.max_concurrency * self.pcfg.n_workers))
            self._probe_lock = asyncio.Lock()
            self._calib_lock = asyncio.Lock()
            self._summary_tasks: dict = {}
            self._inflight: dict = {}
        return self

    def params_for(self, method: str) -> dict:
        p = self.pcfg
        params = {"temperature": p.temperature, "max_tokens": p.max_output_tokens, "seed": p.seed}
        if method == "logprobs":
            params.update(logprobs=True, top_logprobs=self.cfg.top_logprobs)
        elif method == "samples":
            params.update(temperature=self.cfg.sample_temperature, n=self.cfg.samples)
        return params

    async def request(self, msgs: list[dict], rf: dict | None, params: dict, usage: dict,
                    answer: int) -> tuple[dict | None, Exception | None, bool]:
        """One answer to msgs: from the cache, else one request through the limiter (the gate).
        (answer, None, from_cache) or (None, error, False)."""
        from rlsim.personas.cache import request_key
        from rlsim.personas.gate import LimiterGate

        self._state()  # this event loop's semaphore

        key = request_key(self.spec.kind, self.spec.model, self.spec.base_url, {**params, "response_format": rf},
                          msgs) + f":{answer}"
        cache = self.engine.cache if self.pcfg.cache else None
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                usage["cached_requests"] += 1
                return hit, None, True
        gate = LimiterGate(self.engine.limiter, self.pcfg.prices, self.spec.model, usage)
        async with self._sem:
            try:
                res = await self.engine._chat(gate, msgs, rf, params)
            except Exception as exc:  # noqa: BLE001 - classified by the caller
                return None, exc, False
        now = time.monotonic()
        self.t_first = self.t_first or now
        self.t_last = now
        value = {"text": res.text, "choices": res.choices or [res.text], "logprobs": res.logprobs,
                 "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens}
        if cache is not None:
            await asyncio.to_thread(cache.put, key, value)
        return value, None, False

    async def after_error(self, exc: Exception, usage: dict, attempt: int) -> tuple[str, bool]:
        """(reason, final): final for the budget and permanent errors; transient ones wait their backoff."""
        from rlsim.personas.backends import BudgetExceeded, PermanentError, TransientError

        if isinstance(exc, BudgetExceeded):
            return "budget", True
        if isinstance(exc, PermanentError):
            usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
            return exc.reason, True
        if isinstance(exc, TransientError):
            usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
            if exc.status == 429 and exc.retry_after:
                await self.engine.limiter.pause(exc.retry_after)
            if attempt < self.pcfg.max_retries:
                await asyncio.sleep(self.engine._backoff(attempt, exc.retry_after))
            return exc.reason, False
        raise exc

    # ------------------------------------------------------------------ rating one prompt
    def _unit(self, builder, user: int, item_ids: list[int], session: Session, summary: str):
        from rlsim.personas.grounding import WorkUnit

        sc = (float(self.scale.min), float(self.scale.max), float(self.scale.step))
        items = [builder.item_rows.get(i, {"item_id": i, "title": f"movie {i}", "year": None, "genres": ""})
                 for i in item_ids]
        ground = builder.similar_rated(user, item_ids)
        shown = []
        if self.cfg.session_max and len(session):
            last = session.last(self.cfg.session_max)
            shown = [(builder.labels.get(int(i), f"movie {int(i)}"), float(r)) for i, r in zip(last.items, last.ratings)]
        return WorkUnit(int(user), list(item_ids), builder.profiles.get(int(user), "A movie viewer."), items,
                        {i: ground[i] for i in item_ids if i in ground}, sc, session=shown, summary=summary)

    async def _ask(self, unit, method: str, usage: dict) -> dict[int, tuple[object, str, bool]]:
        """{item: (distribution | rating | None, failure reason, from_cache)} for one prompt's movies.

        method: logprobs | samples | noise (a distribution) or answer (the plain rating, for calibration).
        Items missing from an answer are asked again (alone) until max_retries; the n-th answer to the
        same prompt has its own cache key, so a rerun replays answers and their retries exactly."""
        from rlsim.personas.prompts import rating_schema
        from rlsim.personas.validate import parse_ratings

        scale = self.scale
        req = "answer" if method in ("noise", "answer") else method
        params = self.params_for(req)
        got: dict[int, tuple] = {}
        reason = {i: "not attempted" for i in unit.item_ids}
        pending = list(unit.item_ids)
        answers_seen: dict[tuple, int] = {}  # answers so far to each prompt (its movies)
        tries = 0
        while pending and tries <= self.pcfg.max_retries:
            sub = unit if len(pending) == len(unit.item_ids) else unit.subset(pending)
            msgs, rf = sub.messages(), rating_schema(sub.item_ids, scale)
            n_before = answers_seen.get(tuple(pending), 0)
            res, exc, hit = await self.request(msgs, rf, params, usage, n_before + unit.answer_offset)
            tries += 1
            if res is None:
                why, final = await self.after_error(exc, usage, tries - 1)
                for i in pending:
                    reason[i] = why
                if final:
                    break
                continue
            answers_seen[tuple(pending)] = n_before + 1
            texts = res.get("choices") or [res.get("text", "")]
            parsed = [parse_ratings(t, pending, scale) for t in texts]
            first = parsed[0]
            if first.parse == "failed":
                usage["errors"]["malformed_json"] = usage["errors"].get("malformed_json", 0) + 1
            for i in pending:
                if i in first.invalid:
                    reason[i] = first.invalid[i]
                elif i not in first.ratings:
                    reason[i] = "malformed_json" if first.parse == "failed" else (
                        "truncated_json" if first.parse == "regex" else "missing_from_answer")
            if req == "logprobs":
                lps = (res.get("logprobs") or [None])[0]
                if lps:
                    dists, no = logprob_distributions(lps, [i for i in pending if i in first.ratings], scale)
                    for i, p in dists.items():
                        got[i] = (p, "", hit)
                    for i, w in no.items():
                        if i in first.ratings:
                            reason[i] = w
                else:
                    for i in pending:
                        if i in first.ratings:
                            reason[i] = "no_logprobs"
            elif req == "samples":
                C = scale.n_classes
                if len(texts) < min(2, self.cfg.samples):  # n ignored: one answer is no histogram
                    for i in pending:
                        reason[i] = "single_completion"
                    break
                for i in pending:
                    vals = [pp.ratings[i] for pp in parsed if i in pp.ratings]
                    if not vals:
                        continue
                    counts = np.bincount(scale.to_class(np.array(vals)), minlength=C).astype(np.float64)
                    p = counts + self.cfg.smoothing / C
                    got[i] = (p / p.sum(), "", hit)
            else:
                for i in pending:
                    if i in first.ratings:
                        got[i] = (float(first.ratings[i]), "", hit)
            # An answer without a distribution at its rating token is not asked again the same way:
            # the caller asks for those movies by the next method.
            pending = [i for i in pending if i not in got and reason[i] not in LOGPROB_GAPS]
        for i in unit.item_ids:
            if i not in got:
                got[i] = (None, reason[i], False)
        return got
