"""Persona simulators. The offline persona (no LLM) is a point predictor with calibrated noise;
LLM personas get their distribution from the endpoint (rlsim.simulators.llm)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rlsim.simulators.point import PointSimulator


class _OfflinePredictor:
    """fit(train, scale) / predict(users, items) around the offline persona's unsnapped answer."""

    def __init__(self, cfg, item_ids: np.ndarray, vectors: np.ndarray | None):
        self.cfg, self.item_ids, self.vectors = cfg, item_ids, vectors

    def fit(self, train: pd.DataFrame, scale) -> "_OfflinePredictor":
        from rlsim.personas.backends.offline import OfflinePersona

        self.model = OfflinePersona(self.cfg).fit(train, scale, self.item_ids, self.vectors)
        return self

    def predict(self, users, items) -> np.ndarray:
        return self.model.predict_raw(np.asarray(users), np.asarray(items))


def offline_persona_simulator(ds, train: pd.DataFrame, persona_cfg, vectors: np.ndarray | None,
                              seed: int = 0) -> PointSimulator:
    """The offline persona's unsnapped answer + ordinal noise fitted on a training hold-out.

    Not an LLM: a deterministic stand-in grounded in the user's own ratings (docs/simulators.md)."""
    item_ids = ds.items["item_id"].to_numpy()
    return PointSimulator.fit("offline_persona", lambda: _OfflinePredictor(persona_cfg.offline, item_ids, vectors),
                              train, ds.scale, seed=seed)


def build_offline_persona(ds, train: pd.DataFrame, persona_cfg, text_model: str, cache_dir: str,
                          seed: int = 0) -> PointSimulator:
    """The offline persona simulator with its item-text vectors (the one place it is built)."""
    from rlsim.embeddings import item_text_vectors

    return offline_persona_simulator(ds, train, persona_cfg, item_text_vectors(ds.items, text_model, cache_dir), seed)
