"""Cluster-wide rate limiter: token buckets for requests/min and tokens/min, plus the budget.

``RateLimiter`` is the plain object (used in-process); ``LimiterActor`` wraps it as a named Ray
actor shared by every persona worker. Callers *reserve* capacity and get back how long to wait
before sending, so the actor never blocks. A 429 from the server pauses every caller until its
Retry-After has passed.
"""

from __future__ import annotations

import asyncio
import time

from rlsim.personas.cost import Budget

LIMITER_NAME = "rlsim_persona_limiter"


class RateLimiter:
    def __init__(self, rpm: float, tpm: float, budget_usd: float | None = None, burst_s: float = 0.0,
                 clock=time.monotonic):
        self.clock = clock
        self.req_rate = rpm / 60.0
        self.tok_rate = tpm / 60.0
        # No burst by default (one request): requests go out evenly paced, so a server's own bucket
        # or sliding window never sees more than the limit, whatever its burst allowance.
        self.req_cap = max(1.0, self.req_rate * burst_s)
        self.tok_cap = max(1.0, self.tok_rate * burst_s)
        self.req = self.req_cap
        self.tok = self.tok_cap
        self.last = clock()
        self.paused_until = 0.0
        self.budget = Budget(budget_usd)
        self.granted = 0
        self.throttled = 0

    def _refill(self, now: float) -> None:
        dt = max(0.0, now - self.last)
        self.last = now
        self.req = min(self.req_cap, self.req + dt * self.req_rate)
        self.tok = min(self.tok_cap, self.tok + dt * self.tok_rate)

    def reserve(self, tokens: int, est_usd: float = 0.0) -> float:
        """Seconds to wait before sending, or -1.0 when the budget would be exceeded."""
        if not self.budget.reserve(est_usd):
            return -1.0
        now = self.clock()
        self._refill(now)
        self.req -= 1.0
        self.tok -= min(float(tokens), self.tok_cap)  # one huge request must not block forever
        wait = max(0.0, -self.req / self.req_rate, -self.tok / self.tok_rate, self.paused_until - now)
        self.granted += 1
        return wait

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        self.budget.settle(reserved_usd, actual_usd)

    def pause(self, seconds: float) -> None:
        """A 429 with Retry-After: nobody sends until it has passed."""
        self.throttled += 1
        self.paused_until = max(self.paused_until, self.clock() + seconds)

    def stats(self) -> dict:
        return {"granted": self.granted, "throttled": self.throttled, "spent_usd": self.budget.spent_usd,
                "reserved_usd": self.budget.reserved_usd}


class LocalLimiter:
    """Async facade over an in-process RateLimiter (same interface as RayLimiter)."""

    def __init__(self, limiter: RateLimiter):
        self.limiter = limiter

    async def reserve(self, tokens: int, est_usd: float = 0.0) -> float:
        return self.limiter.reserve(tokens, est_usd)

    async def settle(self, reserved_usd: float, actual_usd: float) -> None:
        self.limiter.settle(reserved_usd, actual_usd)

    async def pause(self, seconds: float) -> None:
        self.limiter.pause(seconds)

    async def stats(self) -> dict:
        return self.limiter.stats()


class RayLimiter:
    """Async facade over the named LimiterActor handle."""

    def __init__(self, handle):
        self.handle = handle

    async def reserve(self, tokens: int, est_usd: float = 0.0) -> float:
        return await self.handle.reserve.remote(tokens, est_usd)

    async def settle(self, reserved_usd: float, actual_usd: float) -> None:
        await self.handle.settle.remote(reserved_usd, actual_usd)

    async def pause(self, seconds: float) -> None:
        await self.handle.pause.remote(seconds)

    async def stats(self) -> dict:
        return await self.handle.stats.remote()


def limiter_actor(rpm: float, tpm: float, budget_usd: float | None = None, name: str = LIMITER_NAME,
                  namespace: str | None = None):
    """Create (or fetch) the named limiter actor; Ray must already be initialised."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class LimiterActor(RateLimiter):
        pass

    return LimiterActor.options(name=name, namespace=namespace, get_if_exists=True,
                                lifetime=None).remote(rpm, tpm, budget_usd)


async def sleep_until_allowed(limiter, tokens: int, est_usd: float = 0.0) -> bool:
    """Reserve and wait; False when the budget refused the request."""
    wait = await limiter.reserve(tokens, est_usd)
    if wait < 0:
        return False
    if wait > 0:
        await asyncio.sleep(wait)
    return True
