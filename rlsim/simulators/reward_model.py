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
