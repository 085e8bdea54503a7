"""The align stage, step by step: prepare (users, validation slice, earlier lessons, profiles, the plan
of every user), the dry run, the alignment requests (resumable: OUT/align/), the lessons and their
records, the before/after measurement on the validation slice, and metrics.json."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pandas as pd

from rlsim.data.splits import Split
from rlsim.errors import ConfigError
from rlsim.io import read_json, write_json, write_parquet
from rlsim.personas import prompts as P
from rlsim.personas.align.budget import align_engine, ledger_spend, stage_cap, stage_spend
from rlsim.personas.align.config import ALIGN_FORMAT, OFFLINE_REFUSAL, AlignConfig
from rlsim.personas.align.journal import AlignJournal, user_is_final
from rlsim.personas.align.plan import demonstrations_frame, item_rows, plan_user, split_validation
from rlsim.personas.align.report import (answer_summary, describe_counts, estimate_align, fidelity_subset,
                                         per_user)
from rlsim.personas.align.state import AlignRun, Written
from rlsim.personas.align.user import align_user
from rlsim.personas.backends.factory import check_backend
from rlsim.personas.lessons import (LESSONS_FORMAT, MAX_LESSON_CHARS, lessons_dir, lessons_fingerprint,
                                    load_lessons, sha_json)
from rlsim.personas.pairs import profiles_for_job
from rlsim.personas.stages_common import (backend_spec, evaluable_users, need_ray, response_cache_path,
                                          sample_users, split_fingerprint)
from rlsim.personas.usage import empty_usage, merge_usage


def align_identity(spec, cfg, acfg: AlignConfig, data_cfg, split, users, profiles_sha: str,
                   current_sha: str | None) -> dict:
    return {"format": ALIGN_FORMAT, **spec.cache_identity(), "temperature": cfg.temperature,
            "max_output_tokens": cfg.max_output_tokens, "persona_seed": cfg.seed, "dataset": data_cfg.dataset,
            "split": split.name, "split_fingerprint": split_fingerprint(split), "seed": data_cfg.seed,
            "align": dataclasses.asdict(acfg), "prompts_sha256": P.align_prompts_sha256(),
            "profiles_sha256": profiles_sha, "previous_lessons_sha256": current_sha,
            "users_sha256": sha_json([int(u) for u in users])}


def prepare(data_cfg, cfg, acfg: AlignConfig, spec, out: Path, *, users, profiles, lessons, api_key, use_ray,
            progress) -> AlignRun:
    """The chosen users, their demonstration pool and validation slice, earlier lessons (checked), profiles,
    and every user's plan (or why they are skipped)."""
    from rlsim.data import load_split

    ds, split = load_split(data_cfg)
    chosen = sample_users(evaluable_users(split), users, data_cfg.seed)
    if not len(chosen):
        raise ConfigError("no users to align (none of the chosen users has training and held-out ratings)")
    pool_all, val_all = split_validation(split.train, acfg.validation_frac, data_cfg.seed)
    pool = pool_all[pool_all["user_id"].isin(chosen)].reset_index(drop=True)
    val = val_all[val_all["user_id"].isin(chosen)].reset_index(drop=True)
    msplit = Split(split.name, pool_all, split.test)
    notes: list[str] = []
    current: dict[int, list[str]] = {}
    cinfo = None
    if lessons is not None:
        current, cinfo = load_lessons(lessons, data_cfg, split)
        d = pd.read_parquet(lessons_dir(lessons) / "demonstrations.parquet", columns=["user_id", "item_id"])
        leak = d.merge(val[["user_id", "item_id"]], on=["user_id", "item_id"])
        if len(leak):
            raise ConfigError(f"lessons in {lessons} were learned from {len(leak)} ratings this run holds out for "
                              "validation; align with the same --validation-frac and --seed")
        current = {u: v for u, v in current.items() if u in set(int(x) for x in chosen)}
    texts, pinfo = profiles_for_job(profiles, data_cfg, msplit, chosen, ds)
    if profiles is not None:
        pr = lessons_dir(profiles)
        if (pr / "profile_ratings.parquet").is_file():
            used = pd.read_parquet(pr / "profile_ratings.parquet", columns=["user_id", "item_id"])
            n_in = len(used.merge(val[["user_id", "item_id"]], on=["user_id", "item_id"]))
            if n_in:
                notes.append(f"the profiles in {profiles} were built from all training ratings, {n_in} of them in "
                             "the validation slice: both before and after are measured with that profile, so their "
                             "difference is the lessons' effect but their levels are optimistic")
    align_texts = {u: P.profile_with_lessons(t, current.get(u, [])) for u, t in texts.items()}
    rows = item_rows(ds.items)
    seqs = {int(u): g.sort_values(["timestamp", "item_id"], kind="stable")
            for u, g in pool.groupby("user_id")}
    plans: dict[int, dict] = {}
    skipped: dict[int, str] = {}
    val_users = set(val["user_id"].astype(int))
    for u in chosen:
        u = int(u)
        p = plan_user(u, seqs[u], acfg, data_cfg.seed, rows) if u in seqs else None
        if p is None or u not in val_users:
            skipped[u] = "too_few_ratings" if p is None else "no_validation_ratings"
            continue
        plans[u] = p
    demos = demonstrations_frame(plans, pool)
    version = int(cinfo["version"] or 0) + 1 if cinfo else 1
    return AlignRun(data_cfg, cfg, acfg, spec, out, profiles, api_key, use_ray, progress, ds, split, msplit, chosen,
                    pool, val, notes, current, cinfo, texts, pinfo, align_texts, rows, plans, skipped, demos, version)


def estimate(r: AlignRun) -> dict:
    """The dry run: the alignment requests and both measurements, estimated; nothing is called."""
    cfg, acfg = r.cfg, r.acfg
    pvals = r.val[r.val["user_id"].isin(list(r.plans))]
    est = estimate_align(r.plans, r.texts, r.current, acfg, r.rows, r.ds.scale, cfg)
    placeholder = {u: ["x" * (MAX_LESSON_CHARS - 20)] * acfg.max_lessons for u in r.plans}
    _, before = r.rate(cfg, pvals[["user_id", "item_id"]], r.out / "before" / "job", dry_run=True, progress=False,
                       lessons=r.current or None)
    _, after = r.rate(cfg, pvals[["user_id", "item_id"]], r.out / "after" / "x", dry_run=True, progress=False,
                      lessons=placeholder)
    total = {k: est[k] + before[k] + after[k] for k in ("requests", "prompt_tokens", "completion_tokens",
                                                         "cost_usd")}
    res = {"backend": cfg.backend, "model": cfg.model, "users": len(r.plans), "skipped_users": len(r.skipped),
           "align": est, "before": {k: before[k] for k in ("requests", "prompt_tokens", "completion_tokens",
                                                           "cost_usd", "pairs")},
           "after": {k: after[k] for k in ("requests", "prompt_tokens", "completion_tokens", "cost_usd",
                                           "pairs")},
           "total": total, "budget_usd": cfg.budget_usd, "price_known": before.get("price_known"),
           "token_counter": before.get("token_counter"),
           "note": "every answer usable at the first try; the reflection at its largest (every answer wrong); "
                   "the after-measurement with the longest lessons"
                   + ("; TinyTroupe wraps each request in its agent specification, so it sends far more"
                      if cfg.backend == "tinytroupe" else "")}
    write_json(r.out / "dry_run.json", res)
    return res


def open_manifest(r: AlignRun, ident: dict) -> dict:
    """OUT/align/manifest.json: created, or resumed when it holds the same alignment (else a ConfigError)."""
    mpath = r.out / "align" / "manifest.json"
    manifest = {"identity": ident, "resumed": 0, "created": time.time()}
    if mpath.is_file():
        old = read_json(mpath)
        if old.get("identity") != ident:
            o = old.get("identity") or {}
            keys = sorted(k for k in set(o) | set(ident) if o.get(k) != ident.get(k))
            raise ConfigError(f"{r.out} holds another alignment ({', '.join(keys)} differ); use a new --out folder")
        manifest = {**old, "resumed": int(old.get("resumed", 0)) + 1}
    write_json(mpath, manifest)
    return manifest


def align_users(r: AlignRun, ident: dict, journal: AlignJournal) -> tuple[dict[int, dict], dict]:
    """Every user not final yet, aligned (each finished user journaled at once): (latest entry per user,
    usage of this run)."""
    cfg, acfg, adir = r.cfg, r.acfg, r.out / "align"
    latest, usage_before, _ = journal.load()
    for u, why in r.skipped.items():
        if u not in latest:
            e = {"user_id": u, "status": "skipped", "reason": why, "lessons": [], "records": [], "usage": empty_usage(),
                 "index": {}, "steps": {}}
            journal.append(e)
            latest[u] = e
    todo = [u for u in r.plans if u not in latest or not user_is_final(latest[u])]
    spend = stage_spend(r.out)
    spent_align = max(float(usage_before["cost_usd"]), spend["align"])
    spend["align"] = spent_align
    usage_run = empty_usage()
    if not todo:
        return latest, usage_run
    job = "align-" + sha_json({"out": str(r.out.resolve()), "identity": ident})[:12]
    engine, reg = align_engine(cfg, r.spec, response_cache_path(r.data_cfg, cfg), r.use_ray, job, adir / "spend.json",
                               spent_align, stage_cap(cfg.budget_usd, spend, "align"))
    if reg is not None and reg.get("stricter_elsewhere"):
        r.notes.append(f"another job on this cluster asked for stricter limits: {reg['rpm']:g} requests/min, "
                       f"{reg['tpm']:g} tokens/min")
    tries = cfg.max_retries + 1

    async def main():
        from tqdm import tqdm

        sem = asyncio.Semaphore(max(1, cfg.max_concurrency))
        # Users in flight: enough to keep the requests busy, few enough that a budget stop leaves users
        # aligned or not started rather than many half done (a user's reflection waits for its answers).
        users_sem = asyncio.Semaphore(max(1, cfg.max_concurrency // 2))
        bar = tqdm(total=len(todo), desc="aligning users", disable=not r.progress, unit="user")

        async def one(u):
            start = dict((latest.get(u) or {}).get("index") or {})
            try:
                async with users_sem:
                    return await align_user(engine, r.plans[u], r.align_texts[u], r.current.get(u, []), acfg, tries,
                                            r.ds.scale, r.rows, sem, start)
            except Exception as exc:  # noqa: BLE001 - one user's crash is recorded, never the whole run's
                return {"user_id": u, "status": "failed", "reason": f"error: {type(exc).__name__}",
                        "lessons": [], "records": [], "usage": empty_usage(), "index": start, "steps": {}}

        try:
            for fut in asyncio.as_completed([one(u) for u in todo]):
                e = await fut
                journal.append(e)
                latest[e["user_id"]] = e
                usage_run.update(merge_usage(usage_run, e["usage"]))
                bar.update(1)
        finally:
            bar.close()
            await engine.aclose()

    try:
        asyncio.run(main())
    finally:
        if reg is not None:
            engine.limiter.handle.unregister.remote(engine.limiter.job)
    return latest, usage_run


def write_lessons(r: AlignRun, ident: dict, latest: dict[int, dict], runs: dict[int, int]) -> Written:
    """OUT/lessons.parquet, demonstrations.parquet, answers.parquet, align_users.parquet and lessons.json."""
    out, plans, version = r.out, r.plans, r.version
    entries = [latest[u] for u in sorted(latest) if u in plans or u in r.skipped]
    ok = {int(e["user_id"]): list(e["lessons"]) for e in entries if e["status"] == "ok"}
    lrows = [(u, version, j + 1, t) for u, ls in sorted(ok.items()) for j, t in enumerate(ls)]
    write_parquet(pd.DataFrame(lrows, columns=["user_id", "version", "lesson", "text"]).astype(
        {"user_id": "int64", "version": "int64", "lesson": "int64", "text": "object"}), out / "lessons.parquet")
    write_parquet(r.demos.assign(version=version), out / "demonstrations.parquet")
    recs = [{"user_id": int(e["user_id"]), **rec} for e in entries for rec in e.get("records", [])]
    answers = pd.DataFrame(recs, columns=["user_id", "step", "key", "item_id", "other_item_id", "real", "guess",
                                          "choice", "correct"])
    write_parquet(answers.astype({"correct": "object"}), out / "answers.parquet")
    urows = []
    for e in entries:
        us = e.get("usage") or {}
        ev = e.get("evidence") or {}
        urows.append({"user_id": int(e["user_id"]), "status": e["status"], "reason": e["reason"],
                      "lessons": len(e["lessons"]), "demonstrations": len(plans[e["user_id"]]["demo_items"])
                      if e["user_id"] in plans else 0, "runs": runs.get(int(e["user_id"]), 0),
                      "next_state_bias": ev.get("bias"), "next_state_mae": ev.get("mae"),
                      "pairs_right": ev.get("pairs_right"), "pairs": ev.get("n_pairs"),
                      "requests_last_run": us.get("requests", 0), "cost_usd_last_run": us.get("cost_usd", 0.0)})
    write_parquet(pd.DataFrame(urows), out / "align_users.parquet")
    lsha = lessons_fingerprint(ok)
    status = pd.Series([e["status"] for e in entries]).value_counts().to_dict() if entries else {}
    user_fail = pd.Series([e["reason"] for e in entries if e["status"] == "failed"]).value_counts().to_dict()
    step_fail: dict[str, dict[str, int]] = {}
    for e in entries:
        for k, s in (e.get("steps") or {}).items():
            step = "next_state" if k.startswith("ns") else k
            step_fail.setdefault(step, {})
            step_fail[step][s["reason"]] = step_fail[step].get(s["reason"], 0) + 1
    data_cfg, cfg, acfg, cinfo = r.data_cfg, r.cfg, r.acfg, r.cinfo
    meta = {"format": LESSONS_FORMAT, "version": version,
            "parent": {k: cinfo[k] for k in ("source", "version", "sha256")} if cinfo else None,
            "dataset": data_cfg.dataset, "split": r.split.name, "split_fingerprint": ident["split_fingerprint"],
            "seed": data_cfg.seed, "validation": {"frac": acfg.validation_frac, "seed": data_cfg.seed,
                                                  "ratings": int(len(r.val))},
            "backend": cfg.backend, "model": cfg.model, "temperature": cfg.temperature,
            "prompts_sha256": ident["prompts_sha256"], "align": dataclasses.asdict(acfg),
            "profiles": r.pinfo, "users": {"chosen": int(len(r.chosen)), "aligned": len(ok),
                                           "failed": int(status.get("failed", 0)),
                                           "skipped": int(status.get("skipped", 0))},
            "lessons_sha256": lsha, "lessons": "lessons.parquet", "demonstrations": "demonstrations.parquet",
            "demonstrations_sha256": sha_json(r.demos[["user_id", "item_id", "rating", "timestamp"]].to_numpy(
                float).tolist()), "created": time.time()}
    write_json(out / "lessons.json", meta)
    return Written(entries, ok, answers, status, user_fail, step_fail, lsha)


def measure(r: AlignRun, w: Written, usage_align: dict) -> tuple[pd.DataFrame, dict, dict]:
    """Fidelity before and after on the validation slice of the aligned users (two ordinary resumable rating
    jobs, each under what is left of the budget): (those pairs with both predictions, before's and after's
    summary)."""
    out, cfg, val, current, ok = r.out, r.cfg, r.val, r.current, w.ok
    aligned = sorted(ok)
    vpairs = val[val["user_id"].isin(aligned)][["user_id", "item_id", "rating"]].reset_index(drop=True)
    before = after = pd.DataFrame(columns=["user_id", "item_id", "predicted", "status", "reason"])
    sb: dict = {}
    sa: dict = {}
    if len(vpairs):
        bpairs = val[val["user_id"].isin(list(r.plans))][["user_id", "item_id"]].reset_index(drop=True)
        spend = {**stage_spend(out), "align": max(float(usage_align["cost_usd"]), stage_spend(out)["align"])}
        before, sb = r.rate(dataclasses.replace(cfg, budget_usd=stage_cap(cfg.budget_usd, spend, "before")), bpairs,
                            out / "before" / "job", dry_run=False, progress=r.progress, lessons=current or None)
        adir_after = out / "after" / w.lessons_sha[:12] / "job"
        this_after = ledger_spend(adir_after / "spend.json")
        spend = {**stage_spend(out), "align": spend["align"]}
        spend = {**spend, "after": this_after, "other_after": spend["after"] - this_after}
        after, sa = r.rate(dataclasses.replace(cfg, budget_usd=stage_cap(cfg.budget_usd, spend, "after")),
                           vpairs[["user_id", "item_id"]], adir_after, dry_run=False, progress=r.progress,
                           lessons={u: current.get(u, []) for u in aligned} | ok)
        r.notes += [f"before: {n}" for n in sb.get("notes", []) if "run the same command" not in n]
        r.notes += [f"after: {n}" for n in sa.get("notes", []) if "run the same command" not in n]
    cmp = vpairs.merge(before[["user_id", "item_id", "predicted"]].rename(columns={"predicted": "before"}),
                       on=["user_id", "item_id"], how="left") \
        .merge(after[["user_id", "item_id", "predicted"]].rename(columns={"predicted": "after"}),
               on=["user_id", "item_id"], how="left")
    write_parquet(cmp, out / "validation.parquet")
    return cmp, sb, sa


def metrics(r: AlignRun, w: Written, manifest: dict, cmp: pd.DataFrame, sb: dict, sa: dict, usage_align: dict,
            usage_run: dict) -> dict:
    """OUT/metrics.json: fidelity before/after and their delta, usage, spend, failures, notes."""
    cfg, acfg, data_cfg, notes, ok = r.cfg, r.acfg, r.data_cfg, r.notes, w.ok
    aligned = sorted(ok)
    vpairs = r.val[r.val["user_id"].isin(aligned)]
    both = cmp.dropna(subset=["before", "after"])
    fb, fa = fidelity_subset(both, r.ds.scale, "before"), fidelity_subset(both, r.ds.scale, "after")
    delta = {k: fa[k] - fb[k] for k in fb if k != "n" and isinstance(fb.get(k), float) and isinstance(
        fa.get(k), float)}
    usage_b, usage_a = sb.get("usage", empty_usage()), sa.get("usage", empty_usage())
    transient = sorted(e["reason"] for e in w.entries if e["status"] == "failed" and not user_is_final(e))
    if transient:
        notes.append(f"{len(transient)} users were not aligned for a transient reason "
                     f"({', '.join(sorted(set(transient)))}); run the same command again to retry them")
    for name, s in (("before", sb), ("after", sa)):
        if s.get("retryable_failed"):
            notes.append(f"{s['retryable_failed']} validation pairs of the {name} measurement failed for a "
                         f"transient reason ({', '.join(sorted(s['failure_reasons']))}); run the same command again "
                         "to retry them")
    n_al = len(aligned)
    result = {
        "dataset": data_cfg.dataset, "split": r.split.name, "backend": cfg.backend, "model": cfg.model,
        "persona": "an LLM persona (profile + backend) at the configured endpoint",
        "users": {"chosen": int(len(r.chosen)), "aligned": n_al, "failed": int(w.status.get("failed", 0)),
                  "skipped": int(w.status.get("skipped", 0))},
        "lessons_version": r.version, "lessons_per_user": describe_counts([len(ok[u]) for u in aligned]),
        "validation": {"frac": acfg.validation_frac, "seed": data_cfg.seed,
                       "pairs_of_aligned_users": int(len(vpairs)), "rated_before_and_after": int(len(both))},
        "before": fb, "after": fa, "delta": delta,
        "align_answers": answer_summary(w.answers),
        "usage": {"align": usage_align, "align_this_run": usage_run, "before": usage_b, "after": usage_a},
        "per_aligned_user": per_user(usage_align, n_al),
        "measurement_per_aligned_user": per_user(merge_usage(usage_b, usage_a), n_al),
        "spent_usd": sum(stage_spend(r.out).values()), "budget_usd": cfg.budget_usd,
        "failures": {"users": {str(k): int(v) for k, v in w.user_fail.items()}, "steps": w.step_fail,
                     "before": sb.get("failure_reasons", {}), "after": sa.get("failure_reasons", {})},
        "resumed": manifest.get("resumed", 0), "settings": dataclasses.asdict(acfg),
        "lessons": str(r.out / "lessons.json"), "notes": notes}
    write_json(r.out / "metrics.json", result)
    return result


def run_align(data_cfg, persona_cfg, align_cfg: AlignConfig, out, *, users=None, profiles=None, lessons=None,
              api_key=None, use_ray: bool = True, dry_run: bool = False, progress: bool = True) -> dict:
    """The align stage (``rlsim.personas.run.align_stage`` documents it)."""
    cfg = persona_cfg.validate()
    acfg = align_cfg.validate()
    if cfg.backend == "offline":
        raise ConfigError(OFFLINE_REFUSAL)
    need_ray(use_ray and not dry_run)
    spec = backend_spec(cfg, api_key)
    if not dry_run:
        check_backend(spec)
    r = prepare(data_cfg, cfg, acfg, spec, Path(out), users=users, profiles=profiles, lessons=lessons,
                api_key=api_key, use_ray=use_ray, progress=progress)
    if dry_run:
        return estimate(r)
    ident = align_identity(spec, cfg, acfg, data_cfg, r.split, r.chosen, r.pinfo["sha256"],
                           r.cinfo["sha256"] if r.cinfo else None)
    manifest = open_manifest(r, ident)
    journal = AlignJournal(r.out / "align" / "journal.jsonl")
    latest, usage_run = align_users(r, ident, journal)
    _, usage_align, runs = journal.load()
    w = write_lessons(r, ident, latest, runs)
    cmp, sb, sa = measure(r, w, usage_align)
    return metrics(r, w, manifest, cmp, sb, sa, usage_align, usage_run)
