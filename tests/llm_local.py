"""A real LLM for tests: llama.cpp's server (rlsim.llm_local, xllamacpp) with SmolLM2-135M, once per session.

``local_llm`` starts it (skipped only when xllamacpp is not importable; CI installs it with
`make install-llm-local`). ``RecordingProxy`` sits in front of it: it records every chat request and
its answer, so tests can check what rlsim sent and what came back, and with ``drop`` it removes request
parameters the way a server that ignores them would (``drop=("logprobs", "top_logprobs")``: an endpoint
without logprobs, so the simulator's probe must fall back to samples).

A 135M model rates at chance: these tests check protocol, accounting and paths, never rating quality.
The scripted server (tests/fake_openai.py) stays the place for faults.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

# Four slots: the samples probe asks for n=4 completions (llama.cpp answers n <= its slots), sharing
# one context pool (rlsim's prompts are a few hundred tokens, TinyTroupe's ~6,000).
N_PARALLEL = 4
N_CTX = 16384


@pytest.fixture(scope="session")
def local_llm():
    """The running LocalLLMServer (base_url, model) for the whole test session."""
    pytest.importorskip("xllamacpp", reason="xllamacpp is not installed (make install-llm-local)")
    from rlsim.llm_local import LocalLLMConfig, LocalLLMServer

    srv = LocalLLMServer(LocalLLMConfig(n_parallel=N_PARALLEL, n_ctx=N_CTX, n_threads=2)).start()
    try:
        yield srv
    finally:
        srv.stop()


@dataclass
class Exchange:
    path: str
    body: dict
    status: int
    answer: dict = field(default_factory=dict)


class RecordingProxy:
    """An HTTP proxy to ``upstream`` (…/v1) that records each POST and its answer; ``drop`` names request
    parameters removed before forwarding."""

    def __init__(self, upstream: str, drop: tuple[str, ...] = ()):
        self.upstream = upstream.rstrip("/")
        self.drop = drop
        self.log: list[Exchange] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def chats(self) -> list[Exchange]:
        with self.lock:
            return [x for x in self.log if x.path.endswith("/chat/completions")]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "RecordingProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _forward(self, path: str, raw: bytes) -> tuple[int, bytes, dict]:
        body = json.loads(raw or b"{}")
        for k in self.drop:
            body.pop(k, None)
        # path is /v1/...; upstream already ends in /v1.
        req = urllib.request.Request(self.upstream + path[len("/v1"):], json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        try:
            answer = json.loads(data)
        except ValueError:
            answer = {}
        with self.lock:
            self.log.append(Exchange(path, body, status, answer))
        return status, data, answer

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                status, data, _ = proxy._forward(self.path.split("?", 1)[0], self.rfile.read(n) if n else b"")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler
