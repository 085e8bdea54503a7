"""Which backend a ``BackendSpec`` builds, and whether its install works (``check_backend``): kept apart
from the backend types in ``rlsim.personas.backends``, which the backends themselves import."""

from __future__ import annotations

from rlsim.errors import ConfigError
from rlsim.personas.backends import BackendSpec




def keeps_memory(spec: BackendSpec) -> bool:
    """Whether the backend remembers a user's earlier batches (then they should meet the same worker)."""
    return spec.kind == "tinytroupe"


def check_backend(spec: BackendSpec) -> None:
    """Import what the backend needs, in this process; a ConfigError (one line) when it cannot."""
    if spec.kind == "tinytroupe":
        from rlsim.personas.backends.tinytroupe_backend import load_tinytroupe

        load_tinytroupe()


def build_backend(spec: BackendSpec):
    if spec.kind == "openai":
        from rlsim.personas.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(spec)
    if spec.kind == "tinytroupe":
        from rlsim.personas.backends.tinytroupe_backend import TinyTroupeBackend

        return TinyTroupeBackend(spec)
    raise ConfigError(f"unknown LLM backend '{spec.kind}' (known: openai, tinytroupe; 'offline' needs no LLM)")
