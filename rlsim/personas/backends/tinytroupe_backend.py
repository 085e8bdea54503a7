"""TinyTroupe backend (optional): one TinyPerson per user rates that user's movies.

Supported TinyTroupe releases: 0.6.x (tested: 0.6.0; clients in ``tinytroupe.clients``, one
request per answer) and 0.5.x (tested: 0.5.2; ``tinytroupe.openai_utils``, one request per action,
so a TALK and a DONE per answer). TinyTroupe is not on PyPI: install it from its repository
(docs/personas.md), e.g. ``pip install git+https://github.com/microsoft/TinyTroupe.git@v0.6.0``.

TinyTroupe is configured from code; no config.ini of the user's is read:

- It is imported once per process, quietly: from a private temporary folder whose config.ini turns
  its console and file logging off (no ``tinytroupe.<time>.log`` anywhere), with its banner and
  configuration dump swallowed and the root logger, sys.path and its own logger put back.
- Its retries, waits, cache, concurrency cap, memory consolidation and semantic retrieval (which
  would call an embeddings endpoint on its own) are off: rlsim retries, limits and caches.
- Every request goes through one registered client (``tinytroupe_calls``): TinyTroupe's ``OpenAIClient`` with three hooks
  overridden. ``_setup_from_config``: the calling backend's openai client (its endpoint, key and
  timeout, no retries). ``_raw_model_call``: this backend's model and sampling; the first failure
  ends the answer, so TinyTroupe never resends. ``_count_tokens``: characters / 4, no tiktoken
  download. That openai client's HTTP hooks pass each request through rlsim's gate (reserve
  before it is sent; settle with the server's usage after an answer, or as a failure: a timeout
  at its worst case, a refusal at nothing), so limits, budget and usage see all the traffic.
- One TinyPerson per user lives as long as the backend (a rating job, a Ray worker), so it
  remembers the user's earlier batches; one user's batches run in order, different users in parallel.
  The lock guards only TinyTroupe's process-wide state (import, configuration, the agent registry).
- The agent hears rlsim's instructions (system messages) and request verbatim and TALKs the JSON
  answer; an answer that fails is rolled back out of its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import itertools
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from rlsim.errors import ConfigError
from rlsim.personas.backends import BackendSpec, ChatResult, RequestGate, TransientError
from rlsim.personas.backends.tinytroupe_calls import CURRENT_CALL, Abort, Call, client_class, openai_client

INSTALL = "pip install git+https://github.com/microsoft/TinyTroupe.git@v0.6.0"
# Room for TinyTroupe's actions and cognitive state around the answer (its default, 128k, is refused
# by most models); each request reserves its worst case (this, and its body's bytes) until its usage settles it.
MAX_COMPLETION_TOKENS = 2048
ANSWER_HOW = "Answer with one TALK action whose content is only the JSON object asked for above, then DONE."
PROFILE_LINE = re.compile(r"Profile of user (\d+):[ \t]*([^\n]*)")

# The config.ini TinyTroupe reads from the folder it is imported in: no console or file logging
# (0.6 reads the NONE levels; 0.5 reads only LOGLEVEL).
QUIET_CONFIG = "[Logging]\nLOGLEVEL=ERROR\nLOGLEVEL_CONSOLE=NONE\nLOGLEVEL_FILE=NONE\n"
# Process-wide: rlsim retries, paces, caches and bounds concurrency itself; consolidation and semantic
# retrieval would send LLM and embedding requests of their own.
SETTINGS = {"max_attempts": 1, "waiting_time": 0, "cache_api_calls": False, "max_concurrent_model_calls": 0,
            "enable_memory_consolidation": False, "enable_continuous_contextual_semantic_memory_retrieval": False,
            "action_generator_enable_quality_checks": False}

_LOCK = threading.Lock()  # TinyTroupe's import, configuration, client and agent registries are process-wide
_TT: SimpleNamespace | None = None
_SERIAL = itertools.count()


# ---------------------------------------------------------------- loading TinyTroupe

def load_tinytroupe() -> SimpleNamespace:
    """Import and configure TinyTroupe once per process; ConfigError (one line) when it cannot be loaded."""
    global _TT
    with _LOCK:
        if _TT is None:
            tt = _import_quietly()
            with _contained_side_effects():  # ConfigManager.update logs through the root logger
                _configure(tt)
            _TT = tt
    return _TT


def _import_quietly() -> SimpleNamespace:
    try:
        with _private_cwd(QUIET_CONFIG), _contained_side_effects():
            import tinytroupe
            from tinytroupe.agent import TinyPerson

            clients = _clients_module()
    except Exception as exc:  # noqa: BLE001 - a broken install fails in many ways; all are config errors
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise ConfigError(f"the tinytroupe backend cannot load TinyTroupe ({msg}); it needs TinyTroupe 0.6 or "
                          f"0.5 from its repository: {INSTALL}") from None
    return SimpleNamespace(config_manager=tinytroupe.config_manager, TinyPerson=TinyPerson, clients=clients)


def _clients_module():
    if importlib.util.find_spec("tinytroupe.clients") is not None:  # 0.6
        from tinytroupe import clients
    else:  # 0.5
        from tinytroupe import openai_utils as clients
    return clients


def _configure(tt: SimpleNamespace) -> None:
    missing = object()
    for key, value in SETTINGS.items():
        if tt.config_manager.get(key, missing) is not missing:  # 0.5 lacks some keys (and warns on them)
            tt.config_manager.update(key, value)
    tt.TinyPerson.communication_display = False
    # TinyTroupe turns openai's parsed message into a dict, and pydantic warns about its typed `parsed`
    # field on every answer (harmless: the dict is complete).
    warnings.filterwarnings("ignore", message="Pydantic serializer warnings", category=UserWarning,
                            module="pydantic")
    tt.clients.register_client("rlsim", client_class(tt.clients.OpenAIClient)(cache_api_calls=False))
    tt.clients.force_api_type("rlsim")


@contextlib.contextmanager
def _private_cwd(config_ini: str):
    """TinyTroupe reads config.ini from, and writes its log file to, the working directory."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="rlsim-tinytroupe-") as d:
        with open(os.path.join(d, "config.ini"), "w", encoding="utf-8") as f:
            f.write(config_ini)
        os.chdir(d)
        try:
            yield
        finally:
            os.chdir(old)


@contextlib.contextmanager
def _contained_side_effects():
    """Swallow what TinyTroupe prints; undo what it does to the root logger and sys.path ('.' appended)."""
    root = logging.getLogger()
    level, handlers, had_dot = root.level, list(root.handlers), "." in sys.path
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)
        if not had_dot and "." in sys.path:
            sys.path.remove(".")
        own = logging.getLogger("tinytroupe")  # errors only, through the application's handlers
        for h in list(own.handlers):
            own.removeHandler(h)
        own.propagate = True
        own.setLevel(logging.ERROR)


# ---------------------------------------------------------------- prompts and answers

def talk_text(actions) -> str:
    """Concatenate the content of a TinyPerson's TALK actions (listen_and_act(return_actions=True))."""
    out = []
    for a in actions or []:
        act = a.get("action", a) if isinstance(a, dict) else {}
        if str(act.get("type", "")).upper() == "TALK" and act.get("content"):
            out.append(str(act["content"]))
    return "\n".join(out)


def persona_of(messages: list[dict]) -> tuple[int | None, str]:
    """(user id, profile) from a rating prompt's "Profile of user N: ..." line; (None, '') otherwise."""
    for m in messages:
        if m.get("role") == "user":
            match = PROFILE_LINE.match(str(m.get("content", "")))
            if match:
                return int(match.group(1)), match.group(2).strip()
    return None, ""


def stimulus_text(messages: list[dict]) -> str:
    """What the agent hears: rlsim's instructions (system) and request (user) verbatim, then how to answer."""
    parts = [str(m["content"]) for m in messages if m.get("role") in ("system", "user") and m.get("content")]
    return "\n\n".join(parts + [ANSWER_HOW])


# ---------------------------------------------------------------- the backend

class TinyTroupeBackend:
    gated = True  # sends requests of its own: the engine passes a gate (backends.RequestGate)

    def __init__(self, spec: BackendSpec):
        self.spec = spec
        self.tt = load_tinytroupe()
        self.openai = openai_client(spec)
        self.agents: dict[int, object] = {}  # user id -> TinyPerson
        self._turns: dict[int, asyncio.Lock] = {}
        self._threads = ThreadPoolExecutor(max_workers=32, thread_name_prefix="rlsim-tinytroupe")

    async def chat(self, messages: list[dict], response_format: dict | None, params: dict,
                   gate: RequestGate | None = None) -> ChatResult:
        uid, profile = persona_of(messages)
        loop = asyncio.get_running_loop()
        call = Call(self.openai, self.spec.model, self._settings(params), gate, loop)
        async with self._turn(uid):
            text = await loop.run_in_executor(self._threads, self._answer, call, uid, profile,
                                              stimulus_text(messages))
        if not text:
            raise TransientError("tinytroupe_no_answer")
        return ChatResult(text, call.prompt_tokens, call.completion_tokens, call.requests)

    def _settings(self, params: dict) -> dict:
        out = {"timeout": self.spec.timeout_s, "temperature": params.get("temperature", 0.0),
               "max_completion_tokens": max(MAX_COMPLETION_TOKENS, int(params.get("max_tokens") or 0))}
        if params.get("seed") is not None:
            out["seed"] = params["seed"]
        return out

    def _turn(self, uid: int | None):
        """One user's batches run one after another, in order, so its agent's memory stays a sequence."""
        if uid is None:
            return contextlib.nullcontext()
        return self._turns.setdefault(uid, asyncio.Lock())

    def _answer(self, call: Call, uid: int | None, profile: str, stimulus: str) -> str:
        token = CURRENT_CALL.set(call)
        try:
            person = self._person(uid, profile)
            before = person.encode_complete_state() if uid is not None else None
            try:
                actions = person.listen_and_act(stimulus, return_actions=True)
            except Abort as abort:
                self._roll_back(person, before)
                raise abort.error from None
            except Exception as exc:  # noqa: BLE001 - TinyTroupe failing on an answer it got
                self._roll_back(person, before)
                raise TransientError(f"tinytroupe_error: {type(exc).__name__}") from None
            finally:
                person.pop_latest_actions()  # no environment consumes them
            return talk_text(actions)
        finally:
            call.fail(TransientError("tinytroupe_no_answer"))  # a request still pending got no answer
            CURRENT_CALL.reset(token)

    @staticmethod
    def _roll_back(person, state) -> None:
        if state is not None:  # the failed question and any partial answer leave the agent's memory
            person.decode_complete_state(state)

    def _person(self, uid: int | None, profile: str):
        person = self.agents.get(uid) if uid is not None else None
        if person is None:
            person = self._new_person(uid)
            if uid is not None:
                self.agents[uid] = person
        if profile and person.get("profile") != profile:
            person.define("profile", profile)
        return person

    def _new_person(self, uid: int | None):
        TinyPerson = self.tt.TinyPerson
        name = f"Viewer {uid}" if uid is not None else f"Respondent {next(_SERIAL)}"
        with _LOCK:  # the agent registry is process-wide and wants unique names: ours live here instead
            person = TinyPerson(name)
            TinyPerson.all_agents.pop(name, None)
        if uid is not None:
            person.define("occupation", "movie viewer")
        # TinyTroupe replaces an action too like the agent's last one (character Jaccard > 0.85) by DONE: two
        # JSON answers of one user often are (a second batch, alignment's questions), and the question would
        # go unanswered on every retry. rlsim asks each question once and wants its answer.
        person.enable_basic_action_repetition_prevention = False
        return person

    async def close(self) -> None:
        self._threads.shutdown(wait=False)
        self.openai.close()
