"""Persona backends. LLM backends share one small async interface, ``chat``:

    await backend.chat(messages, response_format, params) -> ChatResult

and raise ``TransientError`` (retry: 429, 5xx, timeouts, connection errors) or
``PermanentError`` (do not retry: 400/401/403/404). Backends are built from a
``BackendSpec`` inside each worker (clients do not travel between processes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlsim.errors import ConfigError

BACKENDS = ("offline", "openai", "tinytroupe")


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


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


def build_backend(spec: BackendSpec):
    if spec.kind == "openai":
        from rlsim.personas.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(spec)
    if spec.kind == "tinytroupe":
        from rlsim.personas.backends.tinytroupe_backend import TinyTroupeBackend

        return TinyTroupeBackend(spec)
    raise ConfigError(f"unknown LLM backend '{spec.kind}' (known: openai, tinytroupe; 'offline' needs no LLM)")
