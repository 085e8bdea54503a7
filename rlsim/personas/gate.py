"""The gate every LLM request passes: reserve from the shared limiter before it is sent, settle after.

This is the one place where a request's rate, tokens and dollars meet the limiter (the cluster's
actor or an in-process one) and the job's usage. The rating engine uses one ``LimiterGate`` per
attempt. For a backend that sends one request per answer (openai) the engine itself calls it
around ``chat``; a gated backend (TinyTroupe, which sends several requests of its own per answer)
gets it and calls it around each HTTP request, so the rate limits, the budget and the usage see
the real traffic.

- ``acquire``: reserves one request, the request's tokens (prompt + completion estimate) and its
  estimated dollars from the limiter's token buckets and the job's budget, and waits for its slot;
  ``BudgetExceeded`` when the job's budget would be exceeded (nothing is sent).
- ``release`` after an answer: ``settle`` corrects the reservation with the usage the server
  reported (prompt + completion tokens) and charges their price.
- ``release`` after a failure (``error``): a timed-out request (or one that failed for a reason
  no backend classified) may have been answered and billed, so it counts at its estimate (a hard
  budget errs on the safe side); a refused one (429, 5xx, 4xx, connection error) costs nothing. Its tokens stay reserved: no usage corrects the estimate.
- The job's spend lives in the limiter (its per-job ledger, ``job/spend.json``, rewritten at every
  reservation and settlement); ``usage`` is this attempt's account of the same requests (the
  journal's), so both always agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlsim.personas.backends import BackendError, BudgetExceeded
from rlsim.personas.cost import cost_usd
from rlsim.personas.limiter import sleep_until_allowed


@dataclass
class Reservation:
    """What ``acquire`` took from the limiter for one request (returned to ``release``)."""

    usd: float
    tokens: int


def charged_on_failure(error: BaseException, reserved_usd: float) -> float:
    """Dollars a failed request counts: its estimate when it timed out or failed unclassified (it may
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
        tokens = int(prompt_tokens) + int(completion_tokens)
        est = cost_usd(self.prices, self.model, prompt_tokens, completion_tokens)
        if not await sleep_until_allowed(self.limiter, tokens, est):
            raise BudgetExceeded()
        self.usage["requests"] += 1
        return Reservation(est, tokens)

    async def release(self, reservation: Reservation, prompt_tokens: int = 0, completion_tokens: int = 0,
                      error: BaseException | None = None) -> None:
        if error is not None:
            charged = charged_on_failure(error, reservation.usd)
            await self.limiter.settle(reservation.usd, charged, reservation.tokens, None)
            self.usage["cost_usd"] += charged
            return
        actual = cost_usd(self.prices, self.model, prompt_tokens, completion_tokens)
        await self.limiter.settle(reservation.usd, actual, reservation.tokens, prompt_tokens + completion_tokens)
        self.usage["prompt_tokens"] += prompt_tokens
        self.usage["completion_tokens"] += completion_tokens
        self.usage["cost_usd"] += actual
