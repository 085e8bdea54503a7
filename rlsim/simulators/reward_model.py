"""The reward model as a simulator: its softmax over rating classes is the distribution.

With a session, the session's items and ratings join the user's rating-history tokens
(rlsim.reward.model.VanillaTransformer.forward), so the same network predicts the next rating
given everything the user has rated so far: AlignUSER's next-state prediction, learned from data.
"""

from __future__ import annotations

import numpy as np

from rlsim.simulators.base import Sessions, Simulator, check_sessions


class RewardModelSimulator(Simulator):
    name = "reward_model"
    method = "softmax"

    def __init__(self, predictor):
        self.predictor = predictor
        self.scale = predictor.scale
        cfg = predictor.cfg
        self.conditions_on_session = bool(cfg.history or cfg.history_ratings)
        if predictor.has_choice:  # a checkpoint trained with reward.choice_weight > 0 also chooses
            self.choice_model = _ChoiceHead(predictor, self.conditions_on_session)

    @classmethod
    def load(cls, checkpoint_dir: str, device: str = "cpu") -> "RewardModelSimulator":
        from rlsim.reward.predict import RewardPredictor

        return cls(RewardPredictor.load(checkpoint_dir, device=device))

    def distribution(self, users, items, sessions: Sessions = None) -> np.ndarray:
        users = np.asarray(users)
        check_sessions(sessions, len(users))
        p = self.predictor.predict_proba(users, np.asarray(items), sessions if self.conditions_on_session else None)
        return p.astype(np.float64)

    def describe(self) -> dict:
        return {**super().describe(), "ensemble": len(self.predictor.models)}


class _ChoiceHead:
    """The reward model's choice head behind the choice-model interface (rlsim.simulators.choice)."""

    name = "head"

    def __init__(self, predictor, use_session: bool):
        self.predictor, self.use_session = predictor, use_session

    def probability(self, users, items, sessions: Sessions = None) -> np.ndarray:
        items = np.asarray(items)
        from rlsim.simulators.choice import not_shown

        p = self.predictor.choice_proba(np.asarray(users), items, sessions if self.use_session else None)
        return not_shown(p, items, sessions)
