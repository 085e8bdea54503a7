"""The requests of one TinyTroupe answer: ``Call`` carries where they go, with which settings and through
which gate (a context variable read in TinyTroupe's thread); the HTTP hooks of the backend's openai
client reserve each request before it is sent and settle it with the server's usage after; the client
class TinyTroupe sends through; and how its failures map onto rlsim's errors."""

from __future__ import annotations

import asyncio
import contextvars
import json
from dataclasses import dataclass

from rlsim.errors import ConfigError
from rlsim.personas.backends import BackendError, BackendSpec, PermanentError, RequestGate, TransientError
from rlsim.personas.backends.openai_backend import backend_error
from rlsim.personas.gate import body_bound
from rlsim.personas.prompts import chars_tokens

CURRENT_CALL: contextvars.ContextVar["Call | None"] = contextvars.ContextVar("rlsim_tinytroupe_call", default=None)


class Abort(BaseException):
    """Carries an rlsim error out through TinyTroupe, which catches every Exception to retry it."""

    def __init__(self, error: BackendError):
        super().__init__(error.reason)
        self.error = error


@dataclass
class Call:
    """One answer: where its requests go, with which settings, through which gate; read in TinyTroupe's
    thread (a context variable), counted by the HTTP hooks of the backend's openai client."""

    openai: object
    model: str
    settings: dict
    gate: RequestGate | None
    loop: asyncio.AbstractEventLoop
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reserved: object | None = None  # the gate's reservation of the request in flight

    def request_params(self, chat_api_params: dict) -> dict:
        return {**chat_api_params, "model": self.model, **self.settings}

    def before_send(self, body: bytes) -> None:
        if self.gate is not None:
            try:
                bound = body_bound(body)
            except ValueError as exc:  # not JSON, or no max tokens: no worst case, so it is not sent
                raise Abort(PermanentError(f"unbounded_request: {str(exc)[:80]}")) from None
            try:
                self.reserved = self._wait(self.gate.acquire(*bound))
            except BackendError as exc:  # the budget: nothing is sent
                raise Abort(exc) from None
        self.requests += 1

    def after_response(self, response) -> None:
        if not response.is_success:  # settled as a failure once the openai client has classified it
            return
        usage = response_usage(response)
        if usage is None and self.reserved is not None:  # no usage: the request counts at its worst case
            usage = (self.reserved.prompt_tokens, self.reserved.completion_tokens)
        prompt_tokens, completion_tokens = usage or (0, 0)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.settle(prompt_tokens, completion_tokens)

    def settle(self, prompt_tokens: int | None = 0, completion_tokens: int | None = 0,
               error: BackendError | None = None) -> None:
        """Release the pending reservation: with the server's usage, or as failed (``error``); idempotent."""
        reserved, self.reserved = self.reserved, None
        if reserved is not None and self.gate is not None:
            self._wait(self.gate.release(reserved, prompt_tokens, completion_tokens, error))

    def fail(self, error: BackendError) -> None:
        """The request in flight (if any) got no usable answer."""
        self.settle(error=error)

    def _wait(self, coro):
        # The gate is async and lives on the event loop that awaits this answer; we are in a worker thread.
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


def current_call() -> Call:
    call = CURRENT_CALL.get()
    if call is None:
        raise RuntimeError("a TinyTroupe request outside an rlsim call (rlsim's client is registered)")
    return call


def _on_request(request) -> None:
    call = CURRENT_CALL.get()
    if call is not None:
        call.before_send(request.content)


def _on_response(response) -> None:
    call = CURRENT_CALL.get()
    if call is not None:
        call.after_response(response)


def offline_tokens(messages: list[dict]) -> int:
    """Prompt tokens of chat messages from their length: no tokenizer file, so no download."""
    return sum(chars_tokens(str(m.get("content", ""))) + 4 for m in messages) + 2


def response_usage(response) -> tuple[int, int] | None:
    """(prompt, completion) tokens the server reported; (0, 0) for an error; None for an answer without
    usage (it is charged its worst case)."""
    if not response.is_success:
        return 0, 0
    try:
        response.read()
        usage = json.loads(response.content).get("usage") or {}
        if usage.get("prompt_tokens") is None or usage.get("completion_tokens") is None:
            return None
        return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (ValueError, AttributeError, TypeError):
        return None


def error_of(exc: Exception) -> BackendError:
    """The rlsim error for what stopped one of TinyTroupe's requests."""
    import openai
    import pydantic

    invalid = tuple(t for t in (getattr(openai, "LengthFinishReasonError", None),
                                getattr(openai, "ContentFilterFinishReasonError", None),
                                pydantic.ValidationError, json.JSONDecodeError) if t is not None)
    if isinstance(exc, invalid):  # an answer that is not the action TinyTroupe asked for (or cut short)
        return TransientError("tinytroupe_invalid_action")
    if isinstance(exc, openai.OpenAIError):  # HTTP status, timeout, connection: as for the openai backend
        return backend_error(exc)
    return TransientError(f"tinytroupe_error: {type(exc).__name__}")


def client_class(base: type) -> type:
    class RlsimClient(base):
        """TinyTroupe's OpenAIClient, sending every request of the rlsim call of the current thread."""

        @property
        def client(self):  # what TinyTroupe's _raw_model_call sends with
            return current_call().openai

        def _setup_from_config(self, *args, **kwargs):
            pass  # the calling backend owns the openai client

        def _count_tokens(self, messages, model):
            return offline_tokens(messages)

        def _raw_model_call(self, model, chat_api_params):
            call = current_call()
            try:
                return super()._raw_model_call(call.model, call.request_params(chat_api_params))
            except Exception as exc:  # noqa: BLE001 - classified here; TinyTroupe would retry it
                error = error_of(exc)
                call.fail(error)  # a timeout counts at its estimate; a refused request costs nothing
                raise Abort(error) from None

    return RlsimClient


def openai_client(spec: BackendSpec):
    import openai

    http = openai.DefaultHttpxClient(event_hooks={"request": [_on_request], "response": [_on_response]})
    kw = dict(api_key=spec.api_key or "none", timeout=spec.timeout_s, max_retries=0, http_client=http)
    if spec.api_version:
        if not spec.base_url:
            raise ConfigError("Azure OpenAI needs an endpoint (AZURE_OPENAI_ENDPOINT or --base-url)")
        return openai.AzureOpenAI(azure_endpoint=spec.base_url, api_version=spec.api_version, **kw)
    return openai.OpenAI(base_url=spec.base_url, **kw)
