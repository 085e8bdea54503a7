"""Token prices, cost of a call, and the budget guard (a hard cap on dollars spent)."""

from __future__ import annotations

from dataclasses import dataclass

from rlsim.errors import ConfigError


def price_of(prices: dict, model: str) -> dict[str, float] | None:
    if model in prices:
        return prices[model]
    # Dated snapshots ("gpt-4o-mini-2024-07-18") cost what their family costs.
    best = max((k for k in prices if model.startswith(k)), key=len, default=None)
    return prices[best] if best else None


def cost_usd(prices: dict, model: str, prompt_tokens: int, completion_tokens: int) -> float:
    p = price_of(prices, model)
    if p is None:
        return 0.0
    return (prompt_tokens * float(p["prompt"]) + completion_tokens * float(p["completion"])) / 1e6


def require_price(prices: dict, model: str) -> None:
    if price_of(prices, model) is None:
        raise ConfigError(f"no price for model '{model}' in personas.prices; add "
                          f"{{'prompt': $/1M, 'completion': $/1M}} to use --budget-usd")


@dataclass
class Budget:
    """Spent and reserved dollars; a request is allowed only while spent+reserved+its cost <= cap."""

    cap_usd: float | None = None
    spent_usd: float = 0.0
    reserved_usd: float = 0.0

    def reserve(self, est_usd: float) -> bool:
        if self.cap_usd is not None and self.spent_usd + self.reserved_usd + est_usd > self.cap_usd + 1e-12:
            return False
        self.reserved_usd += est_usd
        return True

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
        self.spent_usd += actual_usd
