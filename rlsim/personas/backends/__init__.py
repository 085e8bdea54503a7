"""Persona backends. LLM backends share one small async interface, ``chat``:

    await backend.chat(messages, response_format, params) -> ChatResult

and raise ``TransientError`` (retry: 429, 5xx, timeouts, connection errors) or
``PermanentError`` (do not retry: 400/401/403/404). Backends are built from a
``BackendSpec`` inside each worker (clients do not travel between processes).

A backend that sends several HTTP requests per answer (TinyTroupe) sets ``gated = True``: the
engine then passes ``gate=`` (a ``RequestGate``) and the backend calls it around every request
it sends, so the limiter and the usage see the real traffic; otherwise the engine reserves one
request per ``chat``. ``factory.check_backend`` imports what a backend needs, so a broken install
is a ``ConfigError`` before any worker starts; ``factory.build_backend`` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

BACKENDS = ("offline", "openai", "tinytroupe")


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 1  # HTTP requests behind this answer (their tokens are summed above)
    # Every completion when n > 1 was asked (choices[0] is ``text``), and per completion its tokens
    # as [token, logprob, [[alternative, logprob], ...]] when logprobs were asked and returned.
    choices: list[str] | None = None
    logprobs: list[list] | None = None
    usage_reported: bool = True  # False: the answer had no usage (the gate then charges the worst case)


class BackendError(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


class TransientError(BackendError):
    pass


class PermanentError(BackendError):
    pass


class BudgetExceeded(PermanentError):
    """The budget refused a request before it was sent."""

    def __init__(self):
        super().__init__("budget")


class RequestGate(Protocol):
    """Called by a gated backend around each HTTP request it sends (any thread: it runs them on its loop).

    ``rlsim.personas.gate.LimiterGate`` is the implementation: the limiter's token buckets and the
    job's budget ledger, the same path the engine uses around a plain backend's ``chat``.
    """

    async def acquire(self, prompt_tokens: int, completion_tokens: int):
        """Wait until the limiter allows the request (its worst case: ``gate.request_bound``/``body_bound``);
        returns the reservation to hand to ``release``. Raises BudgetExceeded (nothing may be sent)."""

    async def release(self, reservation, prompt_tokens: int | None = 0, completion_tokens: int | None = 0,
                      error: BackendError | None = None) -> None:
        """The request is over: settle with the usage the server reported (None: it reported none, the
        worst case counts), or (``error``: it failed) without usage (a timeout counts at its worst case,
        a refused request costs nothing)."""


@dataclass
class BackendSpec:
    """Everything needed to build a backend in any process. The key never appears in repr/logs."""

    kind: str = "openai"
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_version: str | None = None
    timeout_s: float = 30.0
    api_key: str | None = field(default=None, repr=False)

    def cache_identity(self) -> dict:
        # What identifies answers: never the key.
        return {"backend": self.kind, "model": self.model, "base_url": (self.base_url or "").rstrip("/")}
