"""The ``align`` section (``AlignConfig``) and the constants of an alignment run."""

from __future__ import annotations

from dataclasses import dataclass

from rlsim.errors import ConfigError

ALIGN_FORMAT = 1
OFFLINE_REFUSAL = ("the offline persona is not an LLM and has no lessons: `personas align` needs an LLM backend "
                   "(--backend openai or tinytroupe, with an endpoint); alignment does not apply to offline")
MAX_SHOWN_ERRORS = 20  # wrong predictions listed in the reflection prompt (the largest errors)
PAIR_COMPLETION = 6  # tokens per pair choice ('"p1":"A",')
LESSON_COMPLETION = 40  # tokens per lesson
TRANSPORT = "transport"  # a step failed before any usable answer came back (budget, HTTP, timeout)


@dataclass
class AlignConfig:
    """YAML section ``align`` (flags win)."""

    demos: int = 30  # demonstrations per user: their most recent training ratings outside the validation slice
    chunk: int = 5  # next-state movies per request
    history: int = 8  # real ratings shown before each next-state chunk (the session so far)
    pair_questions: int = 6  # "which did you rate higher?" pairs, in one request
    whatif: int = 4  # "what if the session had shown B instead of A?" cases, in one request
    session: int = 3  # ratings shown before the replaced movie of a what-if session
    max_lessons: int = 3
    validation_frac: float = 0.2  # per-user share of the training ratings held out to measure before/after
    min_demos: int = 4  # users with fewer demonstrations are skipped (recorded)

    def validate(self) -> "AlignConfig":
        for name, lo in (("demos", 1), ("chunk", 1), ("history", 0), ("pair_questions", 0), ("whatif", 0),
                         ("session", 0), ("max_lessons", 1), ("min_demos", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"align: {name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        f = self.validation_frac
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
            raise ConfigError(f"align: validation-frac must be in (0, 1), got {f!r}")
        return self
