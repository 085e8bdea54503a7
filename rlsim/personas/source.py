"""What persona jobs build from a dataset: the prompt builder of LLM personas (profiles, grounding
movies) and the fitted offline persona."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rlsim.data.schema import Dataset
from rlsim.personas.backends.offline import OfflinePersona
from rlsim.personas.config import PersonaConfig
from rlsim.personas.grounding import PromptBuilder
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
