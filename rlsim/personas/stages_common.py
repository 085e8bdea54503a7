"""Helpers every persona stage uses (``run``'s verbs, alignment, the LLM simulator): the backend spec,
the response cache, the split's fingerprint, a job's context, the users of a run, the Ray check."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np

from rlsim.config import DataConfig
from rlsim.errors import ConfigError
from rlsim.personas.backends import BackendSpec
from rlsim.personas.config import PersonaConfig


def backend_spec(cfg: PersonaConfig, api_key: str | None = None) -> BackendSpec:
    """How workers build the backend. The key travels in the spec only (never logged, cached or written)."""
    return BackendSpec(kind=cfg.backend, model=cfg.model, base_url=cfg.base_url, api_version=cfg.api_version,
                       timeout_s=cfg.timeout_s, api_key=api_key)


def response_cache_path(data_cfg: DataConfig, cfg: PersonaConfig) -> str | None:
    return str(Path(data_cfg.cache_dir).expanduser() / "personas" / "responses.sqlite") if cfg.cache else None


def split_fingerprint(split) -> str:
    """sha256 of the split's held-out (user, item) pairs: two splits with one name but other
    seeds or test fractions differ here."""
    t = split.test[["user_id", "item_id"]].astype("int64").sort_values(["user_id", "item_id"])
    return hashlib.sha256(np.ascontiguousarray(t.to_numpy()).tobytes()).hexdigest()


def job_context(data_cfg: DataConfig, split, cfg: PersonaConfig) -> dict:
    """What identifies a rating job beside the backend (rlsim.personas.plan.job_identity): the data, and
    the text model whose vectors choose each prompt's grounding movies (the offline persona's too)."""
    context = {"dataset": data_cfg.dataset, "split": split.name, "split_fingerprint": split_fingerprint(split)}
    if cfg.backend == "offline" or cfg.k_similar > 0:
        context["text_model"] = data_cfg.text_model
    return context


def sample_users(ids: Iterable, n: int | Iterable[int] | None, seed: int) -> np.ndarray:
    """All of ``ids`` (n=None), a seeded sample of n of them, or the given ids that are among them."""
    ids = np.array(sorted(set(int(x) for x in ids)), dtype=np.int64)
    if n is None:
        return ids
    if not isinstance(n, (int, np.integer)):
        want = np.array(sorted(set(int(x) for x in n)), dtype=np.int64)
        return want[np.isin(want, ids)]
    if n <= 0:
        raise ConfigError(f"users must be >= 1, got {n}")
    if n >= len(ids):
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))


def evaluable_users(split) -> np.ndarray:
    """Users with held-out ratings and training ratings (the ones a persona can be scored on)."""
    return np.intersect1d(split.test["user_id"].unique(), split.train["user_id"].unique())


def need_ray(use_ray: bool) -> None:
    if use_ray:
        import ray

        if not ray.is_initialized():
            raise ConfigError("use_ray=True needs a running Ray (the CLI starts or joins one; "
                              "or pass use_ray=False)")
