"""The gate every LLM request passes: reserve from the shared limiter before it is sent, settle after.

This is the one place where a request's rate, tokens and dollars meet the limiter (the cluster's
actor or an in-process one) and the job's usage. The rating engine uses one ``LimiterGate`` per
attempt. For a backend that sends one request per answer (openai) the engine itself calls it
around ``chat``; a gated backend (TinyTroupe, which sends several requests of its own per answer)
gets it and calls it around each HTTP request, so the rate limits, the budget and the usage see
the real traffic.

- ``acquire``: reserves one request and the request's WORST CASE (``request_bound`` /
  ``body_bound``, derived from what is sent: every prompt byte, max_tokens x n completions) from
  the limiter's token buckets and the job's budget, and waits for its slot; ``BudgetExceeded`` when
  that worst case would cross the job's cap (nothing is sent). So a server that answers with up to
  max_tokens (reasoning tokens included) can never take the spend over the cap.
- ``release`` after an answer: ``settle`` replaces the reservation with the usage the server
  reported (the unused tokens go back to the bucket); an answer without usage counts at its worst
  case. A server reporting more than the worst case is charged what it reported (spend is never
  hidden; the limiter counts the overrun and refuses everything once the cap is reached).
- ``release`` after a failure (``error``): a timed-out request (or one that failed for a reason
  no backend classified) may have been answered and billed, so it counts at its worst case; a
  refused one (429, 5xx, 4xx, connection error) costs nothing. Its tokens stay reserved: no usage
  corrects the reservation.
- The job's spend lives in the limiter (its per-job ledger, ``job/spend.json``, rewritten at every
  reservation and settlement); ``usage`` is this attempt's account of the same requests (the
  journal's), so both always agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rlsim.personas.backends import BackendError, BudgetExceeded
from rlsim.personas.cost import cost_usd
from rlsim.personas.limiter import sleep_until_allowed

# Chat templates wrap each message in a few special tokens (role, start, end) and prime the answer;
# generous so that the bound holds for every template we know of.
MESSAGE_OVERHEAD_TOKENS = 8
REQUEST_OVERHEAD_TOKENS = 16


def _utf8(value) -> int:
    return len((value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)).encode("utf-8"))


def prompt_bound(messages: list[dict], response_format: dict | None = None) -> int:
    """An upper bound on the prompt tokens a server can count: a byte-level BPE token is at least one
    byte, so every UTF-8 byte of every message (and of the response schema, which servers put into
    the prompt) plus each message's template tokens."""
    n = sum(_utf8(m.get("content", "")) + _utf8(m.get("role", "")) + MESSAGE_OVERHEAD_TOKENS for m in messages)
    return n + (_utf8(response_format) if response_format else 0) + REQUEST_OVERHEAD_TOKENS


def completion_bound(params: dict) -> int:
    """max_tokens x n: what the server may generate (hidden reasoning tokens count inside max_tokens)."""
    cap = params.get("max_completion_tokens") or params.get("max_tokens")
    if not cap or int(cap) <= 0:
        raise ValueError("a request without max_tokens has no worst case: the budget cannot bound it")
    return int(cap) * max(1, int(params.get("n") or 1))


def request_bound(messages: list[dict], params: dict, response_format: dict | None = None) -> tuple[int, int]:
    """(prompt, completion) worst case of one request, from the same messages and params that are sent."""
    return prompt_bound(messages, response_format), completion_bound(params)


def body_bound(body: bytes) -> tuple[int, int]:
    """The worst case of a raw chat-completions request body (a gated backend's own HTTP request): its
    bytes bound the prompt (the messages and schema are inside it, JSON-escaped)."""
    obj = json.loads(body)
    n_msgs = len(obj.get("messages") or [])
    return len(body) + MESSAGE_OVERHEAD_TOKENS * n_msgs + REQUEST_OVERHEAD_TOKENS, completion_bound(obj)


@dataclass
class Reservation:
    """What ``acquire`` took from the limiter for one request (returned to ``release``): its worst case."""

    usd: float
    tokens: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


def charged_on_failure(error: BaseException, reserved_usd: float) -> float:
    """Dollars a failed request counts: its worst case when it timed out or failed unclassified (it may
    have been answered and billed), nothing when the server refused it (429, 5xx, 4xx, no connection)."""
    if not isinstance(error, BackendError) or error.reason == "timeout":
        return reserved_usd
    return 0.0


class LimiterGate:
    """Implements ``backends.RequestGate`` over a limiter (``LocalLimiter`` or ``RayLimiter``), adding
    each request to ``usage`` (requests, prompt_tokens, completion_tokens, cost_usd)."""

    def __init__(self, limiter, prices: dict, model: str, usage: dict):
        self.limiter = limiter
        self.prices = prices
        self.model = model
        self.usage = usage

    async def acquire(self, prompt_tokens: int, completion_tokens: int) -> Reservation:
        """Reserve a request whose worst case is (prompt_tokens, completion_tokens): bounds, not estimates."""
        tokens = int(prompt_tokens) + int(completion_tokens)
        worst = cost_usd(self.prices, self.model, prompt_tokens, completion_tokens)
        if not await sleep_until_allowed(self.limiter, tokens, worst):
            raise BudgetExceeded()
        self.usage["requests"] += 1
        return Reservation(worst, tokens, int(prompt_tokens), int(completion_tokens))

    async def release(self, reservation: Reservation, prompt_tokens: int | None = 0,
                      completion_tokens: int | None = 0, error: BaseException | None = None) -> None:
        """Settle: with the reported usage; ``None`` tokens (the answer had no usage) count the worst case."""
        if error is not None:
            charged = charged_on_failure(error, reservation.usd)
            await self.limiter.settle(reservation.usd, charged, reservation.tokens, None)
            self.usage["cost_usd"] += charged
            return
        if prompt_tokens is None or completion_tokens is None:
            prompt_tokens, completion_tokens = reservation.prompt_tokens, reservation.completion_tokens
        actual = cost_usd(self.prices, self.model, prompt_tokens, completion_tokens)
        await self.limiter.settle(reservation.usd, actual, reservation.tokens, prompt_tokens + completion_tokens)
        self.usage["prompt_tokens"] += prompt_tokens
        self.usage["completion_tokens"] += completion_tokens
        self.usage["cost_usd"] += actual
