"""The simulator contract: read this first.

A simulated user is asked two questions: "would USER pick ITEM if it were shown now?" and "how
would USER rate ITEM, given what this session has shown so far?". It answers the second with a
probability distribution over the dataset's rating scale, never a single number, and the first
(when it has a choice model) with a probability. Everything else is derived from those:

    distribution(users, items, sessions) -> [n, C] probabilities over scale.values (rows sum to 1)
    score(users, items, sessions)        -> the expectation (the old point prediction)
    sample(users, items, sessions, rng)  -> one draw per pair, from a seeded numpy Generator
    choice(users, items, sessions)       -> [n] P(pick it now); has_choice says whether it can
                                            (NaN where it failed; choice_with_reasons says why)
    outcome(users, items, sessions)      -> [n, 1 + C]: P(skip), then P(pick and rate r)

``sessions`` is ``None`` (no session: the user's training history alone) or one :class:`Session`
per pair: the items this episode has shown the user and the ratings the user gave them (drawn
from the simulator itself while training a policy, or the real ratings when replaying held-out
behaviour). A simulator whose ``conditions_on_session`` is True lets the session move its answer
(a persona that remembers); one whose flag is False answers the same whatever the session.

Every source of reward in rlsim is a Simulator: the baselines (with a residual noise model), the
reward model (its softmax; sessions enter its rating-history tokens, which makes it a learned
world model of the next rating), the offline persona and the LLM personas. ``method`` says how the
distribution was obtained ("softmax", "ordinal noise", "logprobs", "samples", ...), because a
distribution from a model's own probabilities and one from an answer plus calibrated noise do
not mean the same thing. The RL env, the fidelity evaluation and the study all speak only this
interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rlsim.data.schema import RatingScale


@dataclass(frozen=True)
class Session:
    """What one user has been shown in this episode, in order, and how they rated it."""

    items: tuple[int, ...] = ()
    ratings: tuple[float, ...] = ()

    def __post_init__(self):
        if len(self.items) != len(self.ratings):
            raise ValueError(f"a session needs one rating per item ({len(self.items)} vs {len(self.ratings)})")

    def __len__(self) -> int:
        return len(self.items)

    def extend(self, item: int, rating: float) -> "Session":
        return Session(self.items + (int(item),), self.ratings + (float(rating),))

    def last(self, n: int) -> "Session":
        return Session(self.items[-n:], self.ratings[-n:]) if n < len(self) else self


EMPTY = Session()

Sessions = Sequence[Session] | None


def check_sessions(sessions: Sessions, n: int) -> Sessions:
    if sessions is not None and len(sessions) != n:
        raise ValueError(f"{len(sessions)} sessions for {n} pairs")
    return sessions


def has_sessions(sessions: Sessions) -> bool:
    return sessions is not None and any(len(s) for s in sessions)


def expectation(probs: np.ndarray, scale: RatingScale) -> np.ndarray:
    return np.asarray(probs, np.float64) @ scale.values


def sample_from(probs: np.ndarray, scale: RatingScale, rng: np.random.Generator) -> np.ndarray:
    """One rating per row by inverse CDF (rows of probs need not be exactly normalised)."""
    p = np.asarray(probs, np.float64)
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(p)) * cdf[:, -1]
    cls = np.minimum((cdf < u[:, None]).sum(1), p.shape[1] - 1)
    return scale.from_class(cls)


def normalise(probs: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """Rows that sum to 1 with no exact zero (an NLL must stay finite)."""
    p = np.clip(np.asarray(probs, np.float64), floor, None)
    return p / p.sum(1, keepdims=True)


def answered_rows(p: np.ndarray) -> np.ndarray:
    """Rows that are a distribution (finite, with mass); the others are failures."""
    p = np.asarray(p, np.float64)
    return np.isfinite(p).all(1) & (p.sum(1) > 0) if p.ndim == 2 else np.zeros(0, bool)


def unanswered_reasons(p: np.ndarray, reasons=None) -> list[str]:
    """Per row: "" when answered, else its reason (given, or "unanswered" when none is known)."""
    ok = answered_rows(p)
    return ["" if a else ((reasons[j] if reasons is not None else "") or "unanswered") for j, a in enumerate(ok)]


class NoChoiceModel(ValueError):
    """A simulator that only rates was asked whether the user would pick a movie."""


class Simulator:
    """Base class: subclasses implement ``distribution``; score and sample come from it."""

    name: str = "simulator"
    method: str = ""  # how the distribution is obtained (softmax, ordinal noise, logprobs, samples, ...)
    conditions_on_session: bool = False
    scale: RatingScale
    # Would the user pick the movie now (rlsim.simulators.choice)? None: this simulator only rates.
    choice_model = None

    @property
    def has_choice(self) -> bool:
        return self.choice_model is not None

    def choice(self, users, items, sessions: Sessions = None) -> np.ndarray:
        """P(the user picks the movie when it is shown now, given the session), one per pair."""
        if self.choice_model is None:
            raise NoChoiceModel(f"simulated user {self.name!r} has no choice model: it only rates")
        return np.asarray(self.choice_model.probability(users, items, check_sessions(sessions, len(users))), float)

    def choice_with_reasons(self, users, items, sessions: Sessions = None) -> tuple[np.ndarray, list[str]]:
        """``choice`` and, per pair, why it is NaN ("" when answered): a simulator that knows why it failed
        (the LLM persona: budget, http_500, ...) says so; here a NaN is "unanswered"."""
        p = self.choice(users, items, sessions)
        return p, ["" if np.isfinite(x) else "unanswered" for x in p]

    def outcome(self, users, items, sessions: Sessions = None) -> np.ndarray:
        """[n, 1 + C]: P(skip), then P(pick and rate r) for each r of scale.values (rows sum to 1)."""
        p = self.choice(users, items, sessions)
        return np.column_stack([1.0 - p, p[:, None] * self.distribution(users, items, sessions)])

    def distribution(self, users, items, sessions: Sessions = None) -> np.ndarray:
        raise NotImplementedError

    def distribution_with_reasons(self, users, items, sessions: Sessions = None) -> tuple[np.ndarray, list[str]]:
        """``distribution`` and, per row, why it is NaN ("" when answered). A simulator that knows why
        it failed (the LLM persona: budget, http_500, ...) says so; here a NaN row is "unanswered"."""
        p = np.asarray(self.distribution(users, items, sessions), np.float64)
        return p, unanswered_reasons(p)

    def score(self, users, items, sessions: Sessions = None) -> np.ndarray:
        """Expected rating on the dataset's scale (NaN where the simulator could not answer)."""
        return expectation(self.distribution(users, items, sessions), self.scale)

    def sample(self, users, items, sessions: Sessions = None, rng: np.random.Generator | None = None) -> np.ndarray:
        if rng is None:
            raise ValueError("sample() needs a seeded numpy Generator (rng=np.random.default_rng(seed))")
        p = self.distribution(users, items, sessions)
        out = np.full(len(p), np.nan)
        ok = np.isfinite(p).all(1) & (p.sum(1) > 0)
        if ok.any():
            out[ok] = sample_from(p[ok], self.scale, rng)
        return out

    def describe(self) -> dict:
        return {"name": self.name, "method": self.method, "conditions_on_session": self.conditions_on_session,
                "choice": getattr(self.choice_model, "name", None)}
