"""Any OpenAI-compatible chat endpoint (OpenAI, Azure OpenAI, vLLM, ...), via the async client.

The client's own retries are off: the persona engine retries with the shared rate limiter.
"""

from __future__ import annotations

from rlsim.personas.backends import BackendError, BackendSpec, ChatResult, PermanentError, TransientError


def _retry_after(exc) -> float | None:
    resp = getattr(exc, "response", None)
    headers = getattr(resp, "headers", None) or {}
    for h in ("retry-after-ms", "retry-after"):
        v = headers.get(h)
        if v is None:
            continue
        try:
            return float(v) / (1000.0 if h.endswith("ms") else 1.0)
        except ValueError:
            return None
    return None


def backend_error(exc: Exception) -> BackendError:
    """The rlsim error for an exception of the openai client (shared with the TinyTroupe backend)."""
    import openai as oa

    if isinstance(exc, oa.RateLimitError):
        return TransientError("http_429", _retry_after(exc), 429)
    if isinstance(exc, oa.APITimeoutError):
        return TransientError("timeout")
    if isinstance(exc, oa.APIConnectionError):
        return TransientError("connection_error")
    if isinstance(exc, oa.APIStatusError):
        if exc.status_code >= 500 or exc.status_code in (408, 409):
            return TransientError(f"http_{exc.status_code}", _retry_after(exc), exc.status_code)
        return PermanentError(f"http_{exc.status_code}", None, exc.status_code)
    if isinstance(exc, (ValueError, TypeError)):  # unparseable HTTP body
        return TransientError(f"bad_response: {str(exc)[:80]}")
    return TransientError(f"openai_error: {type(exc).__name__}")


def token_logprobs(choice) -> list | None:
    """[[token, logprob, [[alternative, logprob], ...]], ...] of one choice, None when it has none."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return [[t.token, float(t.logprob), [[a.token, float(a.logprob)] for a in (t.top_logprobs or [])]]
            for t in content]


class OpenAIBackend:
    def __init__(self, spec: BackendSpec):
        import openai

        self.spec = spec
        self._openai = openai
        kw = dict(api_key=spec.api_key or "none", timeout=spec.timeout_s, max_retries=0)
        if spec.api_version:
            if not spec.base_url:
                from rlsim.errors import ConfigError

                raise ConfigError("Azure OpenAI needs an endpoint (AZURE_OPENAI_ENDPOINT or --base-url)")
            self.client = openai.AsyncAzureOpenAI(azure_endpoint=spec.base_url, api_version=spec.api_version, **kw)
        else:
            self.client = openai.AsyncOpenAI(base_url=spec.base_url, **kw)

    async def chat(self, messages: list[dict], response_format: dict | None, params: dict) -> ChatResult:
        kw = dict(model=self.spec.model, messages=messages, temperature=params.get("temperature", 0.0),
                  max_tokens=params.get("max_tokens"))
        if params.get("seed") is not None:
            kw["seed"] = params["seed"]
        if response_format is not None:
            kw["response_format"] = response_format
        for k in ("n", "logprobs", "top_logprobs"):  # the LLM persona simulator's distributions
            if params.get(k) is not None:
                kw[k] = params[k]
        try:
            resp = await self.client.chat.completions.create(**kw)
        except (self._openai.OpenAIError, ValueError, TypeError) as exc:
            raise backend_error(exc) from None
        if not resp.choices:
            raise TransientError("no_choices")
        usage = resp.usage
        choices = sorted(resp.choices, key=lambda c: getattr(c, "index", 0) or 0)
        texts = [c.message.content or "" for c in choices]
        reported = usage is not None and getattr(usage, "prompt_tokens", None) is not None \
            and getattr(usage, "completion_tokens", None) is not None
        return ChatResult(text=texts[0],
                          prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                          completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                          usage_reported=reported,
                          choices=texts, logprobs=[token_logprobs(c) for c in choices] if params.get("logprobs")
                          else None)

    async def close(self) -> None:
        await self.client.close()
