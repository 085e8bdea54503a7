"""The persona stage as a library: one function per verb, typed configs in, a result dict out.

    build_profiles_stage(data_cfg, persona_cfg, kind, out, ...)  -> profiles.json's content
    rate_stage(data_cfg, persona_cfg, out, ...)                  -> the rating job's summary
    evaluate_stage(data_cfg, persona_cfg, out, ...)              -> metrics.json's content

These never call ``ray.init()`` and never read environment variables: the CLI
(``rlsim.commands.personas``) reads the API key and endpoint from the environment, starts or joins
Ray, then calls them (the pipeline calls them inside its own Ray). With ``use_ray=True`` Ray must
be running: the work goes to PersonaWorker actors in shards with a manifest and resume, paced by
the cluster's limiter of the endpoint; the offline persona goes through the same actors (answers
from the fitted model, no requests). ``use_ray=False`` runs the same engine in this process.
What the verbs share with alignment (``rlsim.personas.align``) lives in ``stages_common`` and
``pairs`` (``rate_pairs``), which import neither this module nor alignment.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from rlsim.config import DataConfig
from rlsim.errors import ConfigError, RlsimError
from rlsim.io import write_json, write_parquet
from rlsim.personas.backends import BackendSpec
from rlsim.personas.backends.factory import check_backend
from rlsim.personas.config import PersonaConfig
from rlsim.personas.pairs import rate_pairs
from rlsim.personas.stages_common import (backend_spec, evaluable_users, need_ray, response_cache_path,
                                          sample_users, split_fingerprint)

log = logging.getLogger("rlsim.personas")


# ---------------------------------------------------------------- helpers of the verbs

def _limiter(cfg: PersonaConfig, spec: BackendSpec, use_ray: bool, job: str):
    """The cluster's limiter of this endpoint (registered for this job), or one for this process."""
    from rlsim.personas.limiter import LocalLimiter, RateLimiter, limiter_name
    from rlsim.personas.limiter_actor import RayLimiter, cluster_limiter

    if not use_ray:
        return LocalLimiter(RateLimiter(cfg.rpm, cfg.tpm, cfg.budget_usd)), None
    import ray

    handle = cluster_limiter(limiter_name(spec.base_url, spec.model))
    reg = ray.get(handle.register.remote(job, cfg.rpm, cfg.tpm, cfg.budget_usd, 0.0))
    return RayLimiter(handle, job), reg


def _calibrate(df: pd.DataFrame, split, ds, cfg: PersonaConfig) -> pd.DataFrame:
    if cfg.calibrate and len(df):
        from rlsim.personas.calibrate import calibrate

        df["predicted_uncalibrated"] = df["predicted"]
        df["predicted"] = calibrate(df.rename(columns={"predicted": "r"}), split.train, ds.scale, col="r").to_numpy()
        df["predicted_raw"] = df["predicted"]
    return df


# ---------------------------------------------------------------- the verbs

def build_profiles_stage(data_cfg: DataConfig, persona_cfg: PersonaConfig, kind: str, out: str | Path, *,
                         users: int | Iterable[int] | None = None, api_key: str | None = None,
                         use_ray: bool = True, dry_run: bool = False, progress: bool = True) -> dict:
    """Profiles of the split's training ratings -> OUT/profiles.parquet, profile_ratings.parquet, profiles.json.

    users: None = every user with training ratings; an int = a seeded sample (data_cfg.seed) of the
    users a persona can be evaluated on (held-out and training ratings), the same sample
    ``evaluate_stage(users=n)`` draws; or explicit ids. LLM kinds (psych, lusifer) go through the
    cluster's limiter when ``use_ray`` (Ray running), else one in this process; ``dry_run``
    estimates requests, tokens and dollars and calls nothing (OUT/dry_run.json).
    """
    from rlsim.data import load_split
    from rlsim.personas.cost import cost_usd
    from rlsim.personas.profiles import (KINDS, build_profiles, profile_report, profiles_dry_run,
                                         profiles_fingerprint, save_profiles)

    cfg = persona_cfg.validate()
    if kind not in KINDS:
        raise ConfigError(f"unknown profile kind '{kind}' (known: {', '.join(KINDS)})")
    if kind != "structured" and cfg.backend == "offline":
        raise ConfigError(f"'{kind}' profiles need an LLM: set OPENAI_BASE_URL or pass --backend openai")
    need_ray(use_ray and kind != "structured" and not dry_run)
    if kind != "structured" and not dry_run:
        check_backend(backend_spec(cfg))  # a broken install (TinyTroupe) is one ConfigError, before any work
    out = Path(out)
    ds, split = load_split(data_cfg)
    pool = split.train["user_id"].unique() if users is None or not isinstance(users, (int, np.integer)) \
        else evaluable_users(split)
    chosen = sample_users(pool, users, data_cfg.seed)
    train = split.train[split.train["user_id"].isin(chosen)]
    if dry_run:
        from rlsim.personas.usage import PROFILE_COMPLETION_ESTIMATE

        est = profiles_dry_run(kind, train, ds.items, ds.users, ds.scale, cfg.lusifer_last_n, cfg.lusifer_batch)
        c_tok = est["requests"] * PROFILE_COMPLETION_ESTIMATE
        est.update({"completion_tokens": c_tok, "model": cfg.model if kind != "structured" else None,
                    "cost_usd": cost_usd(cfg.prices, cfg.model, est["prompt_tokens"], c_tok)
                    if kind != "structured" else 0.0, "budget_usd": cfg.budget_usd})
        write_json(out / "dry_run.json", est)
        return est
    engine = reg = None
    if kind != "structured":
        from rlsim.personas.cache import ResponseCache
        from rlsim.personas.engine import RatingEngine

        spec = backend_spec(cfg, api_key)
        job = "profiles-" + hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
        limiter, reg = _limiter(cfg, spec, use_ray, job)
        cp = response_cache_path(data_cfg, cfg)
        engine = RatingEngine(spec, cfg, limiter, ResponseCache(cp) if cp else None)
    df = build_profiles(kind, train, ds.items, ds.users, ds.scale, engine, cfg.max_concurrency,
                        cfg.lusifer_last_n, cfg.lusifer_batch, progress=progress)
    stats = {}
    if engine is not None:
        import asyncio

        stats = asyncio.run(engine.limiter.stats())
        if reg is not None:
            engine.limiter.handle.unregister.remote(engine.limiter.job)
    save_profiles(df, train, out)
    report = profile_report(df, kind)
    meta = {"kind": kind, "dataset": data_cfg.dataset, "split": split.name,
            "split_fingerprint": split_fingerprint(split), "seed": data_cfg.seed, "users": int(len(df)),
            "backend": cfg.backend if kind != "structured" else None,
            "model": cfg.model if kind != "structured" else None, **report,
            "profiles_sha256": profiles_fingerprint(df)}
    if engine is not None:
        meta["usage"] = {"spent_usd": stats.get("spent_usd", 0.0), "requests_granted": stats.get("granted", 0)}
    notes = []
    if report["fallbacks"]:
        why = ", ".join(f"{k}: {v}" for k, v in report["fallback_reasons"].items())
        notes.append(f"{report['fallbacks']} of {len(df)} {kind} profiles failed ({why}) and use the structured "
                     "profile instead (kind 'structured' in profiles.parquet)")
    if report.get("lusifer_failed_batches"):
        notes.append(f"{report['lusifer_failed_batches']} of {report['lusifer_batches']} Lusifer batches failed "
                     f"({', '.join(f'{k}: {v}' for k, v in report['lusifer_failed_batch_reasons'].items())}); "
                     "their ratings are not in the summaries")
    if reg is not None and reg.get("stricter_elsewhere"):
        notes.append(f"another job on this cluster asked for stricter limits: {reg['rpm']:g} requests/min, "
                     f"{reg['tpm']:g} tokens/min")
    meta["notes"] = notes
    write_json(out / "profiles.json", meta)
    return meta


def rate_stage(data_cfg: DataConfig, persona_cfg: PersonaConfig, out: str | Path, *,
               pairs: pd.DataFrame | None = None, users: int | Iterable[int] | None = None,
               profiles: str | Path | None = None, api_key: str | None = None, use_ray: bool = True,
               dry_run: bool = False, progress: bool = True, crash_marker: str | None = None,
               lessons: str | Path | None = None) -> dict:
    """Persona ratings of pairs (default: the split's held-out pairs) -> OUT/ratings.parquet, summary.json, job/.

    users: a seeded sample (int) or ids, among the pairs' users. A rerun into the same OUT resumes
    (transient failures are asked again). ``dry_run`` writes OUT/dry_run.json and calls nothing.
    ``lessons``: an OUT folder of ``align_stage`` on the same dataset and split; each user's lessons
    enter every prompt of theirs.
    """
    from rlsim.data import load_split

    cfg = persona_cfg.validate()
    need_ray(use_ray and not dry_run)
    out = Path(out)
    ds, split = load_split(data_cfg)
    pairs = split.test[["user_id", "item_id"]] if pairs is None else \
        pairs[["user_id", "item_id"]].astype("int64").drop_duplicates()
    chosen = sample_users(pairs["user_id"], users, data_cfg.seed)
    pairs = pairs[pairs["user_id"].isin(chosen)].reset_index(drop=True)
    lessons_map, linfo = _lessons_for_job(lessons, data_cfg, split, cfg)
    df, summary = rate_pairs(ds, split, data_cfg, cfg, pairs, out / "job", profiles=profiles, api_key=api_key,
                              use_ray=use_ray, dry_run=dry_run, progress=progress, crash_marker=crash_marker,
                              lessons=lessons_map, lessons_info=linfo)
    if dry_run:
        write_json(out / "dry_run.json", summary)
        return summary
    df = _calibrate(df, split, ds, cfg)
    write_parquet(df, out / "ratings.parquet")
    summary = {"backend": cfg.backend, "model": cfg.model if cfg.backend != "offline" else None,
               "dataset": data_cfg.dataset, "split": split.name, "users": int(len(chosen)), **summary,
               "ratings": str(out / "ratings.parquet")}
    write_json(out / "summary.json", summary)
    return summary


def evaluate_stage(data_cfg: DataConfig, persona_cfg: PersonaConfig, out: str | Path, *,
                   users: int | Iterable[int] | None = None, profiles: str | Path | None = None,
                   reward_checkpoint: str | Path | None = None, ndcg_k: int = 10, api_key: str | None = None,
                   use_ray: bool = True, dry_run: bool = False, progress: bool = True,
                   crash_marker: str | None = None, lessons: str | Path | None = None) -> dict:
    """Fidelity of persona ratings on held-out ratings, beside the baseline gate (and the reward model).

    ``lessons``: an OUT folder of ``align_stage`` (same dataset and split): each user's lessons enter
    every prompt of theirs.

    Writes OUT/metrics.json, pairs.parquet, histogram.png and OUT/job/ (the rating job: manifest,
    journal, shards, ratings); returns what metrics.json holds. users: a seeded sample (int, the
    same one ``build_profiles_stage(users=n)`` draws) or ids of evaluable users; None = all.
    """
    from rlsim.data import load_split
    from rlsim.personas.evaluate import evaluate_persona, plot_histograms

    cfg = persona_cfg.validate()
    if ndcg_k < 1:
        raise ConfigError(f"ndcg_k must be >= 1, got {ndcg_k}")
    need_ray(use_ray and not dry_run)
    out = Path(out)
    ds, split = load_split(data_cfg)
    chosen = sample_users(evaluable_users(split), users, data_cfg.seed)
    test = split.test[split.test["user_id"].isin(chosen)].reset_index(drop=True)
    if not len(test):
        raise ConfigError("no held-out ratings for the chosen users")
    lessons_map, linfo = _lessons_for_job(lessons, data_cfg, split, cfg)
    df, summary = rate_pairs(ds, split, data_cfg, cfg, test[["user_id", "item_id"]], out / "job",
                              profiles=profiles, api_key=api_key, use_ray=use_ray, dry_run=dry_run,
                              progress=progress, crash_marker=crash_marker, lessons=lessons_map,
                              lessons_info=linfo)
    if dry_run:
        write_json(out / "dry_run.json", summary)
        return summary
    df = _calibrate(df, split, ds, cfg)
    pairs = test[["user_id", "item_id", "rating"]].merge(df, on=["user_id", "item_id"], how="left")
    reward = None
    if reward_checkpoint:
        try:
            from rlsim.reward.predict import RewardPredictor
        except ImportError as exc:
            raise RlsimError(f"reward_checkpoint needs rlsim.reward ({exc})") from None
        reward = RewardPredictor.load(reward_checkpoint)
    result = evaluate_persona(split.train, pairs, ds.scale, seed=data_cfg.seed, reward_predictor=reward, k=ndcg_k)
    result = {"dataset": data_cfg.dataset, "split": split.name, "backend": cfg.backend,
              "model": cfg.model if cfg.backend != "offline" else None, "users": int(len(chosen)),
              "calibrated": cfg.calibrate, **result,
              "failure_reasons": summary.get("failure_reasons", {}), "usage": summary.get("usage", {}),
              "job": {k: summary.get(k) for k in ("planned_pairs", "missing_pairs", "retried", "retryable_failed",
                                                  "resumed", "spent_usd", "elapsed_s", "limits", "profiles",
                                                  "lessons")
                      if k in summary},
              "notes": summary.get("notes", [])}
    if cfg.backend == "offline":
        result["offline_config"] = dict(vars(cfg.offline))
    write_parquet(pairs, out / "pairs.parquet")
    write_json(out / "metrics.json", result)
    plot_histograms(result, ds.scale, out / "histogram.png", f"{data_cfg.dataset} {split.name}: {cfg.backend} persona")
    return result


def _lessons_for_job(lessons, data_cfg: DataConfig, split, cfg: PersonaConfig):
    """(user -> lessons, info) from an align OUT folder, checked against this dataset and split; (None, None)."""
    if lessons is None:
        return None, None
    from rlsim.personas.lessons import OFFLINE_LESSONS, load_lessons

    if cfg.backend == "offline":
        raise ConfigError(OFFLINE_LESSONS)
    return load_lessons(lessons, data_cfg, split)


def align_stage(data_cfg: DataConfig, persona_cfg: PersonaConfig, align_cfg, out: str | Path, *,
                users: int | Iterable[int] | None = None, profiles: str | Path | None = None,
                lessons: str | Path | None = None, api_key: str | None = None, use_ray: bool = True,
                dry_run: bool = False, progress: bool = True) -> dict:
    """AlignUSER-style alignment from demonstrations -> OUT/lessons.parquet, lessons.json, demonstrations.parquet,
    answers.parquet, align_users.parquet, validation.parquet, metrics.json (``rlsim.personas.align``).

    Per user: next-state predictions over a time-ordered slice of their training ratings (minus a seeded
    validation slice), pair choices and what-if sessions around those demonstrations, then a reflection on
    the errors that writes at most ``align_cfg.max_lessons`` lessons. Fidelity before and after (the same
    rating prompts without and with the lessons) is measured on the validation slice of the aligned users.
    users: like ``evaluate_stage`` (the same seeded sample for an int). ``lessons``: an earlier OUT to start
    from (the persona refines them; the version goes up). Every request goes through the engine (cache,
    the cluster's limiter when ``use_ray``, retries) under one ``budget_usd`` for the whole run;
    ``dry_run`` estimates it all and calls nothing (OUT/dry_run.json). A rerun into OUT resumes. The
    offline backend is refused: it has no lessons.
    """
    from rlsim.personas.align import run_align
    return run_align(data_cfg, persona_cfg, align_cfg, out, users=users, profiles=profiles, lessons=lessons,
                     api_key=api_key, use_ray=use_ray, dry_run=dry_run, progress=progress)
