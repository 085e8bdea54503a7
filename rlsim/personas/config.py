"""Typed configuration of the persona stage (YAML section ``personas``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlsim.errors import ConfigError

# $ per 1M tokens (prompt, completion); extend or override in YAML under personas.prices.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-4o-mini": {"prompt": 0.15, "completion": 0.60},
    "gpt-4o": {"prompt": 2.50, "completion": 10.00},
    "gpt-4.1-mini": {"prompt": 0.40, "completion": 1.60},
    "gpt-4.1-nano": {"prompt": 0.10, "completion": 0.40},
    "gpt-3.5-turbo": {"prompt": 0.50, "completion": 1.50},
    "fake-model": {"prompt": 1.00, "completion": 2.00},
}


@dataclass
class OfflineConfig:
    """The deterministic, LLM-free persona: bias prior + similarity-weighted neighbours."""

    k: int = 20  # neighbours from the user's own history
    shrink: float = 100.0  # co-rating similarity is damped by n / (n + shrink)
    text_weight: float = 0.3  # weight of MiniLM cosine similarity beside co-rating similarity
    text_floor: float = 0.2  # MiniLM cosines below this carry no weight
    damping: float = 0.5  # added to the sum of |similarities| (pulls towards the bias prior)
    # Blend with biased matrix factorisation. stack=True learns the blend (neighbours, MF, bias,
    # intercept) by least squares on a 10% hold-out of the training ratings, then refits on all of
    # them; stack=False uses the fixed mf_weight. Defaults were chosen on a hold-out of the u1
    # training ratings, never on the u1 test set.
    stack: bool = True
    holdout_frac: float = 0.1
    mf_weight: float = 0.3
    mf_factors: int = 20
    mf_reg: float = 0.1
    snap: bool = True  # integer (on-scale) answers like an LLM's


@dataclass
class PersonaConfig:
    backend: str = "offline"  # offline | openai | tinytroupe
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_version: str | None = None  # set for Azure OpenAI (then base_url is the Azure endpoint)
    temperature: float = 0.0
    max_output_tokens: int = 300
    profile: str = "structured"  # structured | psych | lusifer
    lusifer_last_n: int = 60
    lusifer_batch: int = 20
    batch_size: int = 10  # movies per rating request
    k_similar: int = 3  # own-history movies shown per rated movie
    max_retries: int = 4
    timeout_s: float = 30.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    n_workers: int = 2  # Ray actors
    max_concurrency: int = 16  # in-flight requests per actor
    rpm: float = 500.0  # cluster-wide requests per minute
    tpm: float = 2_000_000.0  # cluster-wide tokens per minute
    shard_users: int = 25  # users per result shard (the unit of resume)
    cache: bool = True
    budget_usd: float | None = None
    calibrate: bool = False
    seed: int = 0
    prices: dict = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_PRICES.items()})
    offline: OfflineConfig = field(default_factory=OfflineConfig)

    def validate(self) -> "PersonaConfig":
        """One-line ConfigErrors for values that cannot work (every entry point calls this)."""
        from rlsim.personas.cost import price_of

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"personas: {what}")

        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ConfigError(f"personas: {name} must be a finite number, got {v!r}")
            return float(v)

        need(self.backend in ("offline", "openai", "tinytroupe"),
             f"backend must be offline, openai or tinytroupe, got {self.backend!r}")
        need(self.profile in ("structured", "psych", "lusifer"),
             f"profile must be structured, psych or lusifer, got {self.profile!r}")
        need(isinstance(self.model, str) and self.model.strip() != "", "model must be a non-empty name")
        need(num("rpm") > 0, f"rpm (requests per minute) must be > 0, got {self.rpm:g}")
        need(num("tpm") > 0, f"tpm (tokens per minute) must be > 0, got {self.tpm:g}")
        need(num("timeout_s") > 0, f"timeout (seconds per request) must be > 0, got {self.timeout_s:g}")
        need(num("temperature") >= 0, f"temperature must be >= 0, got {self.temperature:g}")
        need(num("backoff_base_s") >= 0 and num("backoff_max_s") >= 0, "backoff_base_s and backoff_max_s must be >= 0")
        for name, lo in (("batch_size", 1), ("n_workers", 1), ("max_concurrency", 1), ("shard_users", 1),
                         ("max_output_tokens", 1), ("lusifer_last_n", 1), ("lusifer_batch", 1),
                         ("max_retries", 0), ("k_similar", 0), ("seed", 0)):
            v = getattr(self, name)
            flag = {"n_workers": "workers", "max_concurrency": "concurrency"}.get(name, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                 f"{flag} must be an integer >= {lo}, got {v!r}")
        if self.budget_usd is not None:
            need(num("budget_usd") >= 0, f"budget_usd must be >= 0, got {self.budget_usd:g}")
        need(isinstance(self.prices, dict), "prices must map model -> {prompt, completion} in $ per 1M tokens")
        for m, p in self.prices.items():
            ok = isinstance(p, dict) and {"prompt", "completion"} <= set(p) and all(
                isinstance(p[k], (int, float)) and not isinstance(p[k], bool) and p[k] >= 0
                for k in ("prompt", "completion"))
            need(ok, f"prices.{m} must be {{prompt: $/1M, completion: $/1M}} with numbers >= 0")
        if self.budget_usd is not None and self.backend != "offline" and price_of(self.prices, self.model) is None:
            raise ConfigError(f"no price for model '{self.model}' in personas.prices, so --budget-usd cannot be "
                              f"enforced; add {{prompt: $/1M, completion: $/1M}} for it or drop the budget")
        return self
