"""Any OpenAI-compatible chat endpoint (OpenAI, Azure OpenAI, vLLM, ...), via the async client.

The client's own retries are off: the persona engine retries with the shared rate limiter.
"""

from __future__ import annotations

from rlsim.personas.backends import BackendSpec, ChatResult, PermanentError, TransientError


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
        oa = self._openai
        kw = dict(model=self.spec.model, messages=messages, temperature=params.get("temperature", 0.0),
                  max_tokens=params.get("max_tokens"))
        if params.get("seed") is not None:
            kw["seed"] = params["seed"]
        if response_format is not None:
            kw["response_format"] = response_format
        try:
            resp = await self.client.chat.completions.create(**kw)
        except oa.RateLimitError as exc:
            raise TransientError("http_429", _retry_after(exc), 429) from None
        except oa.APITimeoutError:
            raise TransientError("timeout") from None
        except oa.APIConnectionError:
            raise TransientError("connection_error") from None
        except oa.APIStatusError as exc:
            if exc.status_code >= 500 or exc.status_code in (408, 409):
                raise TransientError(f"http_{exc.status_code}", _retry_after(exc), exc.status_code) from None
            raise PermanentError(f"http_{exc.status_code}", None, exc.status_code) from None
        except (ValueError, TypeError) as exc:  # unparseable HTTP body
            raise TransientError(f"bad_response: {str(exc)[:80]}") from None
        if not resp.choices:
            raise TransientError("no_choices")
        usage = resp.usage
        return ChatResult(text=resp.choices[0].message.content or "",
                          prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                          completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))

    async def close(self) -> None:
        await self.client.close()
