"""TinyTroupe backend (optional): a TinyPerson built from the profile rates the movies.

TinyTroupe is imported lazily (install it from github.com/microsoft/TinyTroupe). It is
configured from code, never from a config.ini in the working directory: the import happens in
an empty temporary folder, the model and sampling settings go through
``tinytroupe.config_manager``, and a registered ``openai_utils.OpenAIClient`` subclass points at
our endpoint with our key and no retries of its own (the rating engine retries, rate-limits and
caches). The person's TALK actions are parsed into the same {item_id: rating} schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
import threading

from rlsim.errors import ConfigError
from rlsim.personas.backends import BackendSpec, ChatResult, TransientError
from rlsim.personas.prompts import estimate_tokens

_LOCK = threading.Lock()  # TinyTroupe keeps global state (config, client registry, agent names)
_COUNTER = itertools.count()


@contextlib.contextmanager
def _empty_cwd():
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="rlsim-tinytroupe-") as d:
        os.chdir(d)
        try:
            yield
        finally:
            os.chdir(old)


def talk_text(actions) -> str:
    """Concatenate the content of a TinyPerson's TALK actions (listen_and_act(return_actions=True))."""
    out = []
    for a in actions or []:
        act = a.get("action", a) if isinstance(a, dict) else {}
        if str(act.get("type", "")).upper() == "TALK" and act.get("content"):
            out.append(str(act["content"]))
    return "\n".join(out)


def split_prompt(messages: list[dict]) -> tuple[str, str]:
    """(persona profile, request) from our rating/profile messages."""
    user = "\n".join(m["content"] for m in messages if m.get("role") == "user")
    first, _, rest = user.partition("\n")
    if first.startswith("Profile of user"):
        return first.split(":", 1)[1].strip(), rest
    return "", user


class TinyTroupeBackend:
    def __init__(self, spec: BackendSpec):
        self.spec = spec
        try:
            with _LOCK, _empty_cwd():
                import tinytroupe
                from tinytroupe import openai_utils
                from tinytroupe.agent import TinyPerson
        except ImportError as exc:
            raise ConfigError("the tinytroupe backend needs TinyTroupe: "
                              "pip install git+https://github.com/microsoft/TinyTroupe.git@main "
                              f"({exc})") from None
        self.TinyPerson = TinyPerson
        TinyPerson.communication_display = False
        settings = {"model": spec.model, "temperature": 0.0, "timeout": spec.timeout_s, "max_attempts": 1,
                    "cache_api_calls": False}
        cm = getattr(tinytroupe, "config_manager", None)
        for k, v in settings.items():
            if cm is not None:
                cm.update(k, v)
            else:  # older releases: a plain dict of defaults
                tinytroupe.default[k] = v
        key, base_url, timeout = spec.api_key, spec.base_url, spec.timeout_s

        class _Client(openai_utils.OpenAIClient):
            def _setup_from_config(self):
                from openai import OpenAI

                self.client = OpenAI(api_key=key or "none", base_url=base_url, timeout=timeout, max_retries=0)

        openai_utils.register_client("rlsim", _Client(cache_api_calls=False))
        openai_utils.force_api_type("rlsim")

    def _rate_sync(self, messages: list[dict]) -> str:
        profile, request = split_prompt(messages)
        with _LOCK:
            person = self.TinyPerson(f"Viewer {next(_COUNTER)}")
            person.define("occupation", "movie viewer")
            person.define("persona_profile", profile or "An ordinary movie viewer.")
            try:
                actions = person.listen_and_act(
                    request + "\nReply by TALKing only the JSON object that maps each id to your rating.",
                    return_actions=True)
            finally:
                clear = getattr(self.TinyPerson, "clear_agents", None)
                if clear is not None:
                    clear()
        return talk_text(actions)

    async def chat(self, messages: list[dict], response_format: dict | None, params: dict) -> ChatResult:
        try:
            text = await asyncio.to_thread(self._rate_sync, messages)
        except Exception as exc:  # noqa: BLE001 - TinyTroupe wraps transport errors in many ways
            raise TransientError(f"tinytroupe_error: {type(exc).__name__}") from None
        if not text:
            raise TransientError("tinytroupe_no_answer")
        # TinyTroupe does not report usage: estimate it (the prompt it sends is larger than ours).
        return ChatResult(text, sum(estimate_tokens(m["content"]) for m in messages), estimate_tokens(text))

    async def close(self) -> None:
        return None
