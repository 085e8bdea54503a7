"""The gate every LLM request passes: reserve from the shared limiter before it is sent, then count it.

The rating engine uses one ``LimiterGate`` per attempt. For a backend that sends one request per
answer the engine itself calls it around ``chat``; a gated backend (TinyTroupe, which sends
several requests of its own per answer) gets it and calls it around each HTTP request, so the
rate limits, the budget and the usage see the real traffic.
"""

from __future__ import annotations

from rlsim.personas.backends import BudgetExceeded
from rlsim.personas.cost import cost_usd
from rlsim.personas.limiter import sleep_until_allowed


class LimiterGate:
    """Implements ``backends.RequestGate`` over a limiter, adding each request to ``usage``."""

    def __init__(self, limiter, prices: dict, model: str, usage: dict):
        self.limiter = limiter
        self.prices = prices
        self.model = model
        self.usage = usage

    async def acquire(self, prompt_tokens: int, completion_tokens: int) -> float:
        est = cost_usd(self.prices, self.model, prompt_tokens, completion_tokens)
        if not await sleep_until_allowed(self.limiter, prompt_tokens + completion_tokens, est):
            raise BudgetExceeded()
        self.usage["requests"] += 1
        return est

    async def release(self, reserved_usd: float, prompt_tokens: int, completion_tokens: int) -> None:
        actual = cost_usd(self.prices, self.model, prompt_tokens, completion_tokens)
        await self.limiter.settle(reserved_usd, actual)
        self.usage["prompt_tokens"] += prompt_tokens
        self.usage["completion_tokens"] += completion_tokens
        self.usage["cost_usd"] += actual
