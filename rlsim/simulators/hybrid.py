"""Hybrid reward with active distillation: the reward model answers first, a persona only where it
is unsure, and the persona's answers are distilled back into the reward model.

For each request the reward model's distribution is computed; where its normalised entropy
(entropy / log C, in [0, 1]) is above ``threshold`` the persona is asked instead (its answer
cached by user, item and session). Every ``distill_every`` new persona answers the reward model
is fine-tuned on all answers so far (soft labels, rlsim.reward.predict.fine_tune), so it grows
surer where the persona has spoken and later steps need fewer persona calls. ``max_persona_calls``
is a hard budget: once spent, the reward model answers alone. threshold 0 asks the persona every
time (persona-only with the same cache); threshold >= 1 never does (the reward model alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlsim.simulators.base import EMPTY, Sessions, Simulator, check_sessions, normalise


@dataclass
class HybridConfig:
    threshold: float = 0.8  # normalised entropy above which the persona answers
    distill_every: int = 500  # new persona answers between fine-tuning rounds (0 = never distil)
    distill_epochs: int = 2
    distill_lr: float = 5e-4
    max_persona_calls: int | None = None  # hard budget of persona answers

    def validate(self) -> "HybridConfig":
        from rlsim.errors import ConfigError

        if self.threshold < 0:
            raise ConfigError(f"hybrid.threshold must be >= 0, got {self.threshold}")
        if self.distill_every < 0 or self.distill_epochs < 0:
            raise ConfigError("hybrid.distill_every and hybrid.distill_epochs must be >= 0")
        if self.max_persona_calls is not None and self.max_persona_calls < 0:
            raise ConfigError("hybrid.max_persona_calls must be >= 0")
        return self


def normalised_entropy(p: np.ndarray) -> np.ndarray:
    q = normalise(p)
    return -(q * np.log(q)).sum(1) / np.log(q.shape[1])


class HybridSimulator(Simulator):
    name = "hybrid"
    method = "softmax + persona where unsure"

    def __init__(self, model_sim, persona: Simulator, cfg: HybridConfig | None = None):
        self.model, self.persona = model_sim, persona
        self.cfg = (cfg or HybridConfig()).validate()
        self.scale = model_sim.scale
        self.conditions_on_session = bool(model_sim.conditions_on_session or persona.conditions_on_session)
        self.answers: dict[tuple, np.ndarray] = {}  # persona's distribution by (user, item, session)
        self.requested = 0  # pairs asked of the hybrid
        self.persona_calls = 0  # pairs the persona actually answered (cache misses)
        self.from_persona = 0  # pairs answered by the persona (cache hits included)
        self.distilled: list[dict] = []
        self._undistilled = 0

    @staticmethod
    def _key(u, i, s) -> tuple:
        s = s or EMPTY
        return int(u), int(i), s.items, s.ratings

    def distribution(self, users, items, sessions: Sessions = None) -> np.ndarray:
        users, items = np.asarray(users), np.asarray(items)
        check_sessions(sessions, len(users))
        p = np.asarray(self.model.distribution(users, items, sessions), np.float64)
        self.requested += len(users)
        unsure = np.flatnonzero(normalised_entropy(p) > self.cfg.threshold)
        if not len(unsure):
            return p
        ss = [None if sessions is None else sessions[j] for j in unsure]
        keys = [self._key(users[j], items[j], s) for j, s in zip(unsure, ss)]
        todo = [n for n, k in enumerate(keys) if k not in self.answers]
        budget = self.cfg.max_persona_calls
        if budget is not None:
            todo = todo[:max(0, budget - self.persona_calls)]
        if todo:
            sub_s = None if sessions is None else [ss[n] for n in todo]
            q = np.asarray(self.persona.distribution(users[unsure[todo]], items[unsure[todo]], sub_s), np.float64)
            for n, row in zip(todo, q):
                if np.isfinite(row).all() and row.sum() > 0:  # a failed persona answer is not cached
                    self.answers[keys[n]] = row
            self.persona_calls += len(todo)
            self._undistilled += len(todo)
        for n, k in enumerate(keys):
            if k in self.answers:
                p[unsure[n]] = self.answers[k]
                self.from_persona += 1
        if self.cfg.distill_every and self._undistilled >= self.cfg.distill_every:
            self.distil()
        return p

    def distil(self) -> dict | None:
        """Fine-tune the reward model on every persona answer so far (no-session answers only: the
        reward model's training pairs carry no session)."""
        from rlsim.reward.predict import fine_tune

        rows = [(k[0], k[1], v) for k, v in self.answers.items() if not k[2]]
        self._undistilled = 0
        if not rows or not self.cfg.distill_epochs:
            return None
        u, i, q = zip(*rows)
        res = fine_tune(self.model.predictor, np.array(u), np.array(i), np.stack(q), epochs=self.cfg.distill_epochs,
                        lr=self.cfg.distill_lr, seed=len(self.distilled))
        self.distilled.append(res)
        return res

    def stats(self) -> dict:
        return {"requested": self.requested, "persona_calls": self.persona_calls, "from_persona": self.from_persona,
                "persona_share": self.from_persona / max(self.requested, 1), "distillations": len(self.distilled),
                "cached_answers": len(self.answers)}

    def describe(self) -> dict:
        return {**super().describe(), "threshold": self.cfg.threshold, "distill_every": self.cfg.distill_every,
                "max_persona_calls": self.cfg.max_persona_calls, "persona": self.persona.describe(), **self.stats()}
