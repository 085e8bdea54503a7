"""Personas as a reward source for the RL env: ``score(user_ids, item_ids) -> ratings``.

Same protocol as ``rlsim.sources.RewardSource``. The offline persona answers in-process; LLM
backends go through the rating engine (cache, limiter, retries); NaN marks a failed rating.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rlsim.data.schema import Dataset
from rlsim.personas.backends import BackendSpec
from rlsim.personas.backends.offline import OfflinePersona
from rlsim.personas.config import PersonaConfig
from rlsim.personas.grounding import PromptBuilder
from rlsim.personas.pool import PersonaRewardSource
from rlsim.personas.profiles import structured_profiles, structured_text


def prompt_builder(ds: Dataset, train: pd.DataFrame, cfg: PersonaConfig, vectors: np.ndarray | None,
                   profiles: dict[int, str] | None = None, users=None) -> PromptBuilder:
    if profiles is None:
        sub = train if users is None else train[train["user_id"].isin(np.asarray(users))]
        st = structured_profiles(sub, ds.items, ds.users, ds.scale)
        profiles = {u: structured_text(p, ds.scale) for u, p in st.items()}
    return PromptBuilder(train, ds.items, ds.scale, profiles, vectors, cfg.k_similar, cfg.batch_size)


def offline_persona(ds: Dataset, train: pd.DataFrame, cfg: PersonaConfig, vectors: np.ndarray | None) -> OfflinePersona:
    return OfflinePersona(cfg.offline).fit(train, ds.scale, ds.items["item_id"].to_numpy(), vectors)


def persona_reward_source(ds: Dataset, train: pd.DataFrame, cfg: PersonaConfig, vectors: np.ndarray | None,
                          spec: BackendSpec | None = None, cache_path: str | None = None,
                          profiles: dict[int, str] | None = None) -> PersonaRewardSource:
    """A plain object; ``ray.remote(PersonaRewardSource)`` it (same args) to share it across env runners."""
    if cfg.backend == "offline" or spec is None:
        return PersonaRewardSource(None, None, cfg, offline_model=offline_persona(ds, train, cfg, vectors),
                                   scale=ds.scale)
    return PersonaRewardSource(prompt_builder(ds, train, cfg, vectors, profiles), spec, cfg, cache_path,
                               scale=ds.scale)
