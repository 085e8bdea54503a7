"""Persona ratings of (user, item) pairs as one resumable rating job (``rate_pairs``): what ``rate``,
``evaluate`` and alignment's before/after measurements share. The offline persona rates a user's
items in one unit; LLM personas get prompts grounded in the user's profile (and lessons)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.config import DataConfig
from rlsim.errors import ConfigError
from rlsim.personas.backends.factory import check_backend
from rlsim.personas.config import PersonaConfig
from rlsim.personas.grounding import WorkUnit
from rlsim.personas.stages_common import backend_spec, job_context, response_cache_path, split_fingerprint

OFFLINE_UNIT_ITEMS = 1000  # the offline persona answers a user's items in one unit (no prompt limit)


def _vectors(ds, data_cfg: DataConfig):
    from rlsim.embeddings import item_text_vectors

    return item_text_vectors(ds.items, data_cfg.text_model, data_cfg.cache_dir)


def profiles_for_job(path, data_cfg: DataConfig, split, users: np.ndarray, ds) -> tuple[dict[int, str], dict]:
    """Profile texts for the job's users from a profiles folder, after checking they were built on this
    dataset and split (another split's training ratings would leak held-out ratings into prompts)."""
    from rlsim.personas.profiles import read_profiles, structured_profiles, structured_text

    texts: dict[int, str] = {}
    info: dict = {"source": "structured (built now)"}
    if path is not None:
        df, meta = read_profiles(path)
        if meta.get("dataset") != data_cfg.dataset or meta.get("split") != split.name:
            raise ConfigError(f"profiles in {path} were built on {meta.get('dataset')} split {meta.get('split')}, "
                              f"this job uses {data_cfg.dataset} split {split.name}; build profiles on the same split")
        fp = meta.get("split_fingerprint")
        if fp is not None and fp != split_fingerprint(split):
            raise ConfigError(f"profiles in {path} were built on another '{split.name}' split of {data_cfg.dataset} "
                              "(other seed or test fraction); build profiles on the same split")
        pr = Path(path) if Path(path).is_dir() else Path(path).parent
        if (pr / "profile_ratings.parquet").is_file():
            used = pd.read_parquet(pr / "profile_ratings.parquet", columns=["user_id", "item_id"])
            leak = used.merge(split.test[["user_id", "item_id"]], on=["user_id", "item_id"])
            if len(leak):
                raise ConfigError(f"profiles in {path} were built from {len(leak)} ratings this split holds out; "
                                  "build profiles on the same split")
        have = df[df["user_id"].isin(users)]
        texts = dict(zip(have["user_id"].astype(int), have["text"]))
        kinds = have["kind"].value_counts().to_dict()
        info = {"source": str(path), "asked_kind": meta.get("kind"), "kinds": {k: int(v) for k, v in kinds.items()}}
    missing = [int(u) for u in users if int(u) not in texts]
    if missing:
        sub = split.train[split.train["user_id"].isin(missing)]
        st = structured_profiles(sub, ds.items, ds.users, ds.scale)
        texts.update({u: structured_text(p, ds.scale) for u, p in st.items()})
        if path is not None:
            info["structured_for_missing_users"] = len(missing)
            info.setdefault("kinds", {})
            info["kinds"]["structured"] = info["kinds"].get("structured", 0) + len(missing)
    blob = json.dumps(sorted((int(u), texts.get(int(u), "")) for u in users))
    info["sha256"] = hashlib.sha256(blob.encode("utf-8")).hexdigest()
    return texts, info


def offline_units(pairs: pd.DataFrame, scale, per_unit: int = OFFLINE_UNIT_ITEMS) -> list[WorkUnit]:
    """Units for the offline persona: a user's items (no prompt, so no batching limit)."""
    sc = (float(scale.min), float(scale.max), float(scale.step))
    out = []
    for u, g in pairs.groupby("user_id", sort=True):
        ids = [int(i) for i in dict.fromkeys(g["item_id"].tolist())]
        for s in range(0, len(ids), per_unit):
            out.append(WorkUnit(int(u), ids[s:s + per_unit], "", [], {}, sc))
    return out


def offline_source(pairs: pd.DataFrame, scale, per_unit: int = OFFLINE_UNIT_ITEMS):
    """``offline_units`` built a group of users at a time, when the job needs them (a ``UnitSource``)."""
    from rlsim.personas.grounding import pairs_source

    return pairs_source(pairs, lambda p: offline_units(p, scale, per_unit), per_unit)


def rate_pairs(ds, split, data_cfg: DataConfig, cfg: PersonaConfig, pairs: pd.DataFrame, job_dir: Path, *,
                profiles, api_key, use_ray, dry_run, progress, crash_marker,
                lessons: dict[int, list[str]] | None = None, lessons_info: dict | None = None
                ) -> tuple[pd.DataFrame, dict]:
    """(user_id, item_id, predicted, predicted_raw, status, reason) for pairs, and the job summary.

    ``lessons`` (user -> lessons from ``personas align``) ride on each user's profile line; the offline
    persona reads none (a ConfigError)."""
    from rlsim.personas.job import dry_run as estimate
    from rlsim.personas.job import run_rating_job

    spec = backend_spec(cfg, api_key)
    users = np.sort(pairs["user_id"].unique())
    context = job_context(data_cfg, split, cfg)
    if not dry_run:
        check_backend(spec)  # before the embeddings: a broken install (TinyTroupe) is one ConfigError
    vectors = None if dry_run and cfg.backend == "offline" else _vectors(ds, data_cfg)
    offline_model = None
    notes = []
    if cfg.backend == "offline" and lessons is not None:
        from rlsim.personas.lessons import OFFLINE_LESSONS

        raise ConfigError(OFFLINE_LESSONS)
    linfo = None
    if cfg.backend == "offline":
        units = offline_source(pairs, ds.scale)
        if profiles is not None:
            notes.append("the offline persona does not read profiles; --profiles was not used")
        if not dry_run:
            from rlsim.personas.source import offline_persona

            offline_model = offline_persona(ds, split.train, cfg, vectors)
    else:
        from rlsim.personas.grounding import PromptBuilder

        texts, pinfo = profiles_for_job(profiles, data_cfg, split, users, ds)
        context["profiles_sha256"] = pinfo["sha256"]
        if lessons is not None:
            from rlsim.personas.lessons import apply_lessons

            texts, linfo = apply_lessons(texts, lessons)
            linfo = {**(lessons_info or {}), **linfo}
            context["lessons_sha256"] = linfo["sha256"]
            if linfo["users_with_lessons"] < linfo["users"]:
                notes.append(f"{linfo['users'] - linfo['users_with_lessons']} of {linfo['users']} users have no "
                             "lessons; they are rated with their profile alone")
        units = PromptBuilder(split.train, ds.items, ds.scale, texts, vectors, cfg.k_similar,
                              cfg.batch_size).source(pairs)
        if pinfo.get("structured_for_missing_users"):
            notes.append(f"{pinfo['structured_for_missing_users']} users had no profile in {profiles}; they use the "
                         "structured profile")
    if dry_run:
        est = estimate(units, spec, cfg)
        return pd.DataFrame(), {**est, "notes": notes, **({"lessons": linfo} if linfo else {})}
    summary = run_rating_job(units, job_dir, spec, cfg, response_cache_path(data_cfg, cfg), use_ray=use_ray,
                             progress=progress, crash_marker=crash_marker, context=context,
                             offline_model=offline_model)
    if cfg.backend != "offline":
        summary["profiles"] = pinfo
    if linfo is not None:
        summary["lessons"] = linfo
    if summary.get("limits", {}).get("note"):
        notes.append(summary["limits"]["note"])
    if summary["retryable_failed"]:
        notes.append(f"{summary['retryable_failed']} pairs failed for a transient reason "
                     f"({', '.join(sorted(summary['failure_reasons']))}); run the same command again to retry them")
    summary["notes"] = notes
    res = pd.read_parquet(job_dir / "ratings.parquet")
    df = pairs[["user_id", "item_id"]].merge(res, on=["user_id", "item_id"], how="left")
    df = df.rename(columns={"rating": "predicted", "raw": "predicted_raw"})
    return df[["user_id", "item_id", "predicted", "predicted_raw", "status", "reason", "attempts", "source"]], summary
