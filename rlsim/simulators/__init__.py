"""Simulated users: one contract (rlsim.simulators.base), several sources, and their fidelity."""

from rlsim.simulators.base import EMPTY, Session, Simulator, sample_from

__all__ = ["EMPTY", "Session", "Simulator", "sample_from"]
