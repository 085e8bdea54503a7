"""Resumable rating jobs: ``run_rating_job`` and ``dry_run``.

Every finished unit is appended to OUT/journal.jsonl at once (durable: results and spend survive a
kill), each shard is written as Parquet when its units are in, and OUT/manifest.json holds the plan
and identity. A rerun into the same folder resumes: answers and permanent failures are final;
transient failures (budget, 429, 5xx, timeouts, connection errors, and unusable answers after all
retries) are asked again, and the summary counts them as ``retried``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Callable

from rlsim.errors import ConfigError
from rlsim.personas.backends import BackendSpec
from rlsim.personas.backends.factory import check_backend
from rlsim.personas.backends.offline import OfflineBackend
from rlsim.personas.cache import ResponseCache
from rlsim.personas.config import PersonaConfig
from rlsim.personas.cost import cost_usd
from rlsim.personas.engine import RatingEngine
from rlsim.personas.gate import request_bound
from rlsim.personas.grounding import UnitSource, WorkUnit
from rlsim.personas.journal import Journal, SpendLedger, replay_journal
from rlsim.personas.limiter import LOCAL_JOB, LocalLimiter, RateLimiter
from rlsim.personas.plan import JobPlan, job_identity, job_key, load_manifest
from rlsim.personas.prompts import estimate_tokens, messages_tokens, rating_schema
from rlsim.personas.shards import ShardWriter, finish_job
from rlsim.personas.usage import completion_estimate
from rlsim.personas.workers import IN_FLIGHT_PER_SLOT, run_ray


def run_rating_job(units: "list[WorkUnit] | UnitSource", out_dir: str | Path, spec: BackendSpec,
                   cfg: PersonaConfig, cache_path: str | None, use_ray: bool = True, progress: bool = True,
                   crash_marker: str | None = None, context: dict | None = None, offline_model=None,
                   probe: dict | None = None) -> dict:
    """Rate all units; returns the summary (also written to OUT/manifest.json and OUT/ratings.parquet).

    ``units``: a list, or a ``UnitSource`` whose units are built a shard at a time. Either way the
    driver holds the rows of the shards in flight only (a window of units is in flight), writes
    each shard's Parquet as it completes, and streams OUT/ratings.parquet from the shard files.
    ``context``: what else identifies the job (dataset, split, a hash of the profiles, ...).
    ``offline_model``: the fitted offline persona when ``spec.kind == "offline"``.
    With ``use_ray`` Ray must be running (the caller starts or joins it): units go to PersonaWorker
    actors, paced by the cluster's limiter of this endpoint and model.
    ``probe``: a dict that receives what the driver held at most (open shards, rows, units in flight).
    """
    cfg.validate()
    if spec.kind == "offline" and offline_model is None:
        raise ConfigError("the offline backend needs the fitted offline persona (offline_model)")
    check_backend(spec)  # a broken install is one ConfigError here, not a traceback per worker or task
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = JobPlan(units, cfg.shard_users)
    identity = job_identity(spec, cfg, context)
    manifest = load_manifest(out_dir, plan.entries(), identity)
    journal = Journal(out_dir / "journal.jsonl")
    replay = replay_journal(journal, plan, manifest, out_dir)
    usage_before = replay.usage
    ledger = SpendLedger(out_dir / "spend.json")
    spent_before = max(float(usage_before["cost_usd"]), ledger.read())
    writer = ShardWriter(out_dir, plan, manifest, journal, replay)
    writer.save_manifest(force=True)
    job = {"key": job_key(out_dir, identity), "spent_before": spent_before}
    limits: dict = {"rpm": cfg.rpm, "tpm": cfg.tpm, "scope": "none (offline)" if spec.kind == "offline" else
                    ("cluster" if use_ray else "this process")}
    bar = _bar(writer.units_to_rate(), progress)
    todo = writer.todo(skipped=bar.update)
    t0 = time.time()
    try:
        if use_ray:
            limits.update(run_ray(todo, writer, spec, cfg, cache_path, job, bar, crash_marker, offline_model,
                                   ledger))
        else:
            _run_local(todo, writer, spec, cfg, cache_path, job, bar, offline_model, ledger)
    finally:
        journal.close()
        bar.close()
        writer.save_manifest(force=True)  # what finished before an interrupt is recorded
        if probe is not None:
            probe.update(max_open_shards=writer.max_open_shards, max_rows_held=writer.max_rows_held,
                         max_in_flight=writer.max_in_flight, shards_written=writer.shards_written,
                         replayed_rows=replay.rows_kept, final_shards=len(replay.final),
                         shards_from_files=len(replay.in_file))
    summary = finish_job(out_dir, plan, manifest, writer, time.time() - t0, usage_before, spent_before,
                         writer.retried, limits)
    return summary


async def _rate_stream(engine: RatingEngine, todo, concurrency: int, window: int, writer: ShardWriter,
                       on_result: Callable[[WorkUnit, dict], None]) -> None:
    """Rate (unit, sub) pairs from an iterator in this process: ``concurrency`` at a time, at most
    ``window`` taken from the iterator and not yet handed to ``on_result``."""
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(j, u, sub):
        async with sem:  # FIFO: units start in the order they were taken, so shards finish in order
            return j, u, await engine.rate_unit(sub)

    pending: set = set()
    it = iter(todo)
    j = 0
    try:
        while True:
            for nxt in itertools.islice(it, max(0, window - len(pending))):  # refill the window
                pending.add(asyncio.ensure_future(one(j, *nxt)))
                j += 1
            writer.max_in_flight = max(writer.max_in_flight, len(pending))
            if not pending:
                break
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for _, u, res in sorted((f.result() for f in done), key=lambda x: x[0]):
                on_result(u, res)
    finally:
        for f in pending:
            f.cancel()
        await engine.aclose()


def _run_local(todo, writer, spec, cfg, cache_path, job, bar, offline_model, ledger) -> None:
    limiter = None
    if spec.kind == "offline":
        engine = RatingEngine(spec, cfg, None, None, backend=OfflineBackend(offline_model, cfg.offline.snap))
    else:
        rl = RateLimiter(cfg.rpm, cfg.tpm, cfg.budget_usd)
        rl.register(LOCAL_JOB, cfg.rpm, cfg.tpm, cfg.budget_usd, job["spent_before"], lease_s=float("inf"),
                    ledger=str(ledger.path))
        limiter = LocalLimiter(rl)
        engine = RatingEngine(spec, cfg, limiter, ResponseCache(cache_path) if cache_path else None)

    def on_result(u, res):
        writer.add(u, res)
        bar.update(1)

    concurrency = cfg.max_concurrency * cfg.n_workers
    asyncio.run(_rate_stream(engine, todo, concurrency, IN_FLIGHT_PER_SLOT * concurrency, writer, on_result))


def _bar(n: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=n, desc="persona units", disable=not progress, unit="req")


def dry_run(units: "list[WorkUnit] | UnitSource", spec: BackendSpec, cfg: PersonaConfig) -> dict:
    """Tokens and dollars the job would use if every unit were answered on the first try (a
    ``UnitSource`` is built and counted a thousand users at a time), and the worst case the budget
    reserves for them (``gate.request_bound``: a cap below ``request_worst_case_usd`` sends nothing)."""
    offline = spec.kind == "offline"
    n_units = n_items = p = c = wp = wc = w_max = 0
    if offline and isinstance(units, UnitSource):
        for a in range(0, len(units.users), 1000):
            for _, n in units.unit_ids(units.users[a:a + 1000]):
                n_units, n_items = n_units + 1, n_items + n
    else:
        for u in units:
            n_units += 1
            n_items += len(u.item_ids)
            if not offline:
                msgs = u.messages()
                p += messages_tokens(msgs)
                c += min(completion_estimate(len(u.item_ids)), cfg.max_output_tokens)
                bp, bc = request_bound(msgs, {"max_tokens": cfg.max_output_tokens},
                                       rating_schema(u.item_ids, u.rating_scale))
                wp, wc, w_max = wp + bp, wc + bc, max(w_max, cost_usd(cfg.prices, spec.model, bp, bc))
    if offline:
        return {"backend": "offline", "requests": 0, "pairs": n_items, "prompt_tokens": 0, "completion_tokens": 0,
                "cost_usd": 0.0, "budget_usd": cfg.budget_usd}
    from rlsim.personas.cost import price_of

    return {"backend": spec.kind, "price_known": price_of(cfg.prices, spec.model) is not None,
            "requests": n_units, "pairs": n_items, "prompt_tokens": p, "completion_tokens": c,
            "prompt_tokens_per_rating": p / max(1, n_items), "model": spec.model,
            "cost_usd": cost_usd(cfg.prices, spec.model, p, c), "budget_usd": cfg.budget_usd,
            "worst_case_usd": cost_usd(cfg.prices, spec.model, wp, wc), "request_worst_case_usd": w_max,
            "token_counter": "tiktoken" if estimate_tokens("a b") != 1 else "chars/4 estimate"}
