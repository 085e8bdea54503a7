"""Policies over RankZero candidates: the RLlib PPO module, training, evaluation, a compact torch PPO."""

from rlsim.policy.config import PolicyConfig

__all__ = ["PolicyConfig"]
