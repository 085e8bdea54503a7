"""The rating engine: one work unit -> one row per (user, item), a rating or a failure with its reason.

Cache first; else reserve capacity from the shared limiter (rate and budget) through a
``LimiterGate`` (``rlsim.personas.gate``: reserve, settle with the reported usage, count), call the
backend, validate, retry what is missing with backoff + jitter. A gated backend (TinyTroupe) gets
the gate and passes each of its own HTTP requests through it. The offline persona is a backend too
(``backends.offline.OfflineBackend``: answers from the fitted model; no request, no cost).
"""

from __future__ import annotations

import asyncio
import random
from typing import Callable

from rlsim.personas.backends import BackendSpec, BudgetExceeded, ChatResult, PermanentError, TransientError
from rlsim.personas.backends.factory import build_backend
from rlsim.personas.backends.offline import OfflineBackend
from rlsim.personas.cache import ResponseCache, request_key
from rlsim.personas.config import PersonaConfig
from rlsim.personas.gate import LimiterGate, request_bound
from rlsim.personas.grounding import WorkUnit
from rlsim.personas.prompts import rating_schema
from rlsim.personas.usage import empty_usage
from rlsim.personas.validate import parse_ratings


class RatingEngine:
    def __init__(self, spec: BackendSpec, cfg: PersonaConfig, limiter, cache: ResponseCache | None = None,
                 backend=None, rng: random.Random | None = None):
        self.spec = spec
        self.cfg = cfg
        self.limiter = limiter
        self.cache = cache
        self.backend = backend
        self.rng = rng or random.Random(cfg.seed)

    def client(self):
        if self.backend is None:
            self.backend = build_backend(self.spec)
        return self.backend

    async def aclose(self) -> None:
        """Close the HTTP client; the next call builds a new one (asyncio.run closes its loop)."""
        if self.backend is not None and hasattr(self.backend, "close"):
            await self.backend.close()
        if not isinstance(self.backend, OfflineBackend):
            self.backend = None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** attempt))
        delay = base * (0.5 + self.rng.random())  # jitter: callers do not retry in lockstep
        return max(delay, retry_after or 0.0)

    async def _chat(self, gate: LimiterGate, messages: list[dict], response_format: dict | None,
                    params: dict) -> ChatResult:
        """One answer. The gate reserves, settles and counts each HTTP request (``rlsim.personas.gate``):
        here around ``chat``, or inside a gated backend around each request it sends (TinyTroupe sends
        several per answer). The reservation is the request's worst case, derived from the very
        messages and params sent. Raises BudgetExceeded when the budget refused a request before it was sent."""
        backend = self.client()
        if getattr(backend, "gated", False):
            return await backend.chat(messages, response_format, params, gate=gate)
        reservation = await gate.acquire(*request_bound(messages, params, response_format))
        try:
            res = await backend.chat(messages, response_format, params)
        except Exception as exc:  # noqa: BLE001 - settled as failed (how it counts: gate.charged_on_failure)
            await gate.release(reservation, error=exc)
            raise
        if res.usage_reported:
            await gate.release(reservation, res.prompt_tokens, res.completion_tokens)
        else:
            await gate.release(reservation, None, None)
        return res

    async def complete(self, messages: list[dict], response_format: dict | None, usage: dict | None = None,
                       answer_index: int = 0) -> tuple[str, str]:
        """One cached, rate-limited, retried free-form call (profiles, alignment): (text, '') or ('', reason).

        ``usage`` (optional, an ``empty_usage()`` dict): counts this call's requests, tokens, dollars,
        cache hits and errors. ``answer_index``: the n-th answer to the same prompt has its own cache
        entry, so a caller can ask again after an unusable answer instead of replaying it.
        """
        cfg = self.cfg
        params = {"temperature": cfg.temperature, "max_tokens": max(cfg.max_output_tokens, 600), "seed": cfg.seed,
                  "response_format": response_format}
        key = request_key(self.spec.kind, self.spec.model, self.spec.base_url, params, messages) + f":{answer_index}"
        hit = self.cache.get(key) if (self.cache is not None and cfg.cache) else None
        if hit is not None:
            if usage is not None:
                usage["cached_requests"] += 1
            return hit["text"], ""
        reason = "not attempted"
        for attempt in range(cfg.max_retries + 1):
            gate = LimiterGate(self.limiter, cfg.prices, self.spec.model, empty_usage() if usage is None else usage)
            try:
                res = await self._chat(gate, messages, response_format, {k: v for k, v in params.items()
                                                                        if k != "response_format"})
            except TransientError as exc:
                reason = exc.reason
                if usage is not None:
                    usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
                if exc.status == 429 and exc.retry_after:
                    await self.limiter.pause(exc.retry_after)
                if attempt < cfg.max_retries:
                    await asyncio.sleep(self._backoff(attempt, exc.retry_after))
                continue
            except PermanentError as exc:  # the budget ("budget") too
                if usage is not None and exc.reason != "budget":
                    usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
                return "", exc.reason
            if self.cache is not None and cfg.cache:
                self.cache.put(key, {"text": res.text, "prompt_tokens": res.prompt_tokens,
                                     "completion_tokens": res.completion_tokens})
            return res.text, ""
        return "", reason

    def _offline_unit(self, unit: WorkUnit) -> dict:
        rating, raw = self.backend.answer(unit)
        rows = [{"user_id": unit.user_id, "item_id": int(i), "rating": float(r), "raw": float(x),
                 "status": "ok", "reason": "", "attempts": 1, "repaired": False, "source": "offline"}
                for i, r, x in zip(unit.item_ids, rating, raw)]
        return {"unit_id": unit.unit_id, "rows": rows, "usage": empty_usage()}

    async def rate_unit(self, unit: WorkUnit) -> dict:
        if isinstance(self.backend, OfflineBackend):
            return self._offline_unit(unit)
        cfg, scale = self.cfg, unit.rating_scale
        self.client()  # build the client before reserving a slot: a slow first build would bunch sends
        usage = empty_usage()
        ratings: dict[int, float] = {}
        repaired: set[int] = set()
        attempts = {i: 0 for i in unit.item_ids}
        reason = {i: "not attempted" for i in unit.item_ids}
        pending = list(unit.item_ids)
        answers_seen: dict[str, int] = {}
        budget_stop = permanent = False
        tries = 0
        while pending and tries <= cfg.max_retries and not budget_stop and not permanent:
            sub = unit.subset(pending)
            msgs = sub.messages()
            rf = rating_schema(sub.item_ids, scale)
            params = {"temperature": cfg.temperature, "max_tokens": cfg.max_output_tokens, "seed": cfg.seed,
                      "response_format": rf}
            base_key = request_key(self.spec.kind, self.spec.model, self.spec.base_url, params, msgs)
            # The n-th answer to the same prompt has its own key, so a rerun replays bad answers and
            # their retries exactly, for free; a resumed unit skips the answers earlier runs used.
            n = answers_seen.get(base_key, 0)
            key = f"{base_key}:{n + unit.answer_offset}"
            hit = self.cache.get(key) if (self.cache is not None and cfg.cache) else None
            for i in pending:
                attempts[i] += 1
            tries += 1
            if hit is not None:
                text = hit["text"]
                usage["cached_requests"] += 1
            else:
                gate = LimiterGate(self.limiter, cfg.prices, self.spec.model, usage)  # counts into usage
                try:
                    res = await self._chat(gate, msgs, rf, {k: v for k, v in params.items() if k != "response_format"})
                except BudgetExceeded:
                    budget_stop = True
                    for i in pending:
                        reason[i] = "budget"
                        attempts[i] -= 1
                    break
                except TransientError as exc:
                    usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
                    for i in pending:
                        reason[i] = exc.reason
                    if exc.status == 429 and exc.retry_after:
                        await self.limiter.pause(exc.retry_after)
                    if tries <= cfg.max_retries:
                        await asyncio.sleep(self._backoff(tries - 1, exc.retry_after))
                    continue
                except PermanentError as exc:
                    usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
                    for i in pending:
                        reason[i] = exc.reason
                    permanent = True
                    break
                text = res.text
                if self.cache is not None and cfg.cache:
                    self.cache.put(key, {"text": text, "prompt_tokens": res.prompt_tokens,
                                         "completion_tokens": res.completion_tokens})
            answers_seen[base_key] = n + 1
            parsed = parse_ratings(text, pending, scale)
            if parsed.parse == "failed":
                usage["errors"]["malformed_json"] = usage["errors"].get("malformed_json", 0) + 1
            for i, r in parsed.ratings.items():
                ratings[i] = r
            repaired.update(parsed.repaired)
            for i in parsed.missing:
                reason[i] = "malformed_json" if parsed.parse == "failed" else (
                    "truncated_json" if parsed.parse == "regex" else "missing_from_answer")
            for i, why in parsed.invalid.items():
                reason[i] = why
            pending = [i for i in pending if i not in ratings]
        rows = []
        for i in unit.item_ids:
            ok = i in ratings
            r = ratings.get(i, float("nan"))
            rows.append({"user_id": unit.user_id, "item_id": int(i), "rating": r, "raw": r,
                         "status": "ok" if ok else "failed", "reason": "" if ok else reason[i],
                         "attempts": attempts[i], "repaired": i in repaired, "source": self.spec.kind})
        return {"unit_id": unit.unit_id, "rows": rows, "usage": usage}


async def rate_units_local(engine: RatingEngine, units: list[WorkUnit], concurrency: int,
                           on_result: Callable[[WorkUnit, dict], None] | None = None) -> list[dict]:
    """Rate units in this process with bounded concurrency (tests, small jobs)."""
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(u):
        async with sem:
            return u, await engine.rate_unit(u)

    out = []
    try:
        # Tasks start in order (as_completed alone would shuffle them), so shards finish in order.
        tasks = [asyncio.ensure_future(one(u)) for u in units]
        for fut in asyncio.as_completed(tasks):
            u, res = await fut
            if on_result is not None:
                on_result(u, res)
            out.append(res)
    finally:
        await engine.aclose()
    return out
