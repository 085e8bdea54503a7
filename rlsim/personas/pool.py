"""Rating engine, Ray actor pool, resumable jobs, and the persona reward source.

- ``RatingEngine.rate_unit``: one work unit -> one row per (user, item): a rating or a failure
  with its reason. Cache first; else reserve capacity from the shared limiter (rate and budget)
  through a ``LimiterGate`` (``rlsim.personas.gate``: reserve, settle with the reported usage,
  count), call the backend, validate, retry what is missing with backoff + jitter. A gated backend
  (TinyTroupe) gets the gate and passes each of its own HTTP requests through it. The offline persona
  is a backend too (answers from the fitted model; no request, no cost).
- ``PersonaWorker``: an async Ray actor wrapping an engine (bounded by max_concurrency), restarted
  after a crash; its tasks are retried, which is safe because units are idempotent and cached.
  Units go round robin; with a backend that remembers (TinyTroupe: one agent per user) all of a
  user's units go to one worker.
- ``run_rating_job``: every finished unit is appended to OUT/journal.jsonl at once (durable:
  results and spend survive a kill), each shard is written as Parquet when its units are in, and
  OUT/manifest.json holds the plan and identity. A rerun into the same folder resumes: answers
  and permanent failures are final; transient failures (budget, 429, 5xx, timeouts, connection
  errors, and unusable answers after all retries) are asked again, and the summary counts them
  as ``retried``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rlsim.errors import ConfigError
from rlsim.io import read_json, write_json, write_parquet
from rlsim.personas.backends import (BackendSpec, BudgetExceeded, ChatResult, PermanentError,
                                     TransientError, build_backend, check_backend, keeps_memory)
from rlsim.personas.cache import ResponseCache, request_key
from rlsim.personas.config import PersonaConfig
from rlsim.personas.cost import cost_usd
from rlsim.personas.gate import LimiterGate, request_bound
from rlsim.personas.grounding import UnitSource, WorkUnit
from rlsim.personas.limiter import LOCAL_JOB, LocalLimiter, RateLimiter
from rlsim.personas.prompts import estimate_tokens, messages_tokens, rating_schema
from rlsim.personas.validate import parse_ratings

log = logging.getLogger(__name__)

ROW_COLUMNS = ["user_id", "item_id", "rating", "raw", "status", "reason", "attempts", "repaired", "source"]
PROFILE_COMPLETION_ESTIMATE = 300  # expected tokens of a psych profile or a Lusifer summary (dry runs only)
IDENTITY_ADDED = ("prompts_sha256", "text_model")  # identity keys later rlsim versions added
JOB_FORMAT = 2  # bumped when the job folder's layout changes (older folders are refused)


def completion_estimate(n_items: int) -> int:
    """Expected completion tokens of a rating answer: for dry runs; reservations use ``gate.request_bound``."""
    return 4 + 7 * n_items  # '"1234": 4,' per item plus braces


def empty_usage() -> dict:
    return {"requests": 0, "cached_requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
            "errors": {}}


def merge_usage(a: dict, b: dict) -> dict:
    out = dict(a)
    for k in ("requests", "cached_requests", "prompt_tokens", "completion_tokens", "cost_usd"):
        out[k] = a.get(k, 0) + b.get(k, 0)
    errs = dict(a.get("errors", {}))
    for k, v in b.get("errors", {}).items():
        errs[k] = errs.get(k, 0) + v
    out["errors"] = errs
    return out


# Failure reasons that are final on resume: the request itself is refused by the endpoint (bad
# request, unknown model or route, too large). Everything else is transient and asked again on the
# next run: budget, http_429/5xx/408/409, timeouts, connection errors, http_401/403 (the key is not
# part of the job, a new one may work), and unusable answers after all retries (malformed,
# truncated, missing or off-scale values: the LLM answering nonsense, which a new request may fix).
RETRY_ON_RESUME_4XX = {"http_401", "http_403", "http_408", "http_409", "http_429"}


def is_final(status: str, reason: str) -> bool:
    if status == "ok":
        return True
    r = str(reason or "")
    return r.startswith("http_4") and r not in RETRY_ON_RESUME_4XX


class OfflineBackend:
    """The offline persona behind the engine's interface: answers a unit from the fitted model."""

    kind = "offline"

    def __init__(self, model, snap: bool = True):
        self.model = model
        self.snap = snap

    def answer(self, unit: WorkUnit) -> tuple[np.ndarray, np.ndarray]:
        users = np.full(len(unit.item_ids), unit.user_id)
        raw = np.asarray(self.model.predict_raw(users, np.asarray(unit.item_ids)), float)
        return (unit.rating_scale.round(raw) if self.snap else raw), raw


class RatingEngine:
    def __init__(self, spec: BackendSpec, cfg: PersonaConfig, limiter, cache: ResponseCache | None = None,
                 backend=None, rng: random.Random | None = None):
        self.spec = spec
        self.cfg = cfg
        self.limiter = limiter
        self.cache = cache
        self.backend = backend
        self.rng = rng or random.Random(cfg.seed)

    def _backend(self):
        if self.backend is None:
            self.backend = build_backend(self.spec)
        return self.backend

    async def aclose(self) -> None:
        """Close the HTTP client; the next call builds a new one (asyncio.run closes its loop)."""
        if self.backend is not None and hasattr(self.backend, "close"):
            await self.backend.close()
        if not isinstance(self.backend, OfflineBackend):
            self.backend = None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** attempt))
        delay = base * (0.5 + self.rng.random())  # jitter: callers do not retry in lockstep
        return max(delay, retry_after or 0.0)

    async def _chat(self, gate: LimiterGate, messages: list[dict], response_format: dict | None,
                    params: dict) -> ChatResult:
        """One answer. The gate reserves, settles and counts each HTTP request (``rlsim.personas.gate``):
        here around ``chat``, or inside a gated backend around each request it sends (TinyTroupe sends
        several per answer). The reservation is the request's worst case, derived from the very
        messages and params sent. Raises BudgetExceeded when the budget refused a request before it was sent."""
        backend = self._backend()
        if getattr(backend, "gated", False):
            return await backend.chat(messages, response_format, params, gate=gate)
        reservation = await gate.acquire(*request_bound(messages, params, response_format))
        try:
            res = await backend.chat(messages, response_format, params)
        except Exception as exc:  # noqa: BLE001 - settled as failed (how it counts: gate.charged_on_failure)
            await gate.release(reservation, error=exc)
            raise
        if res.usage_reported:
            await gate.release(reservation, res.prompt_tokens, res.completion_tokens)
        else:
            await gate.release(reservation, None, None)
        return res

    async def complete(self, messages: list[dict], response_format: dict | None, usage: dict | None = None,
                       answer_index: int = 0) -> tuple[str, str]:
        """One cached, rate-limited, retried free-form call (profiles, alignment): (text, '') or ('', reason).

        ``usage`` (optional, an ``empty_usage()`` dict): counts this call's requests, tokens, dollars,
        cache hits and errors. ``answer_index``: the n-th answer to the same prompt has its own cache
        entry, so a caller can ask again after an unusable answer instead of replaying it.
        """
        cfg = self.cfg
        params = {"temperature": cfg.temperature, "max_tokens": max(cfg.max_output_tokens, 600), "seed": cfg.seed,
                  "response_format": response_format}
        key = request_key(self.spec.kind, self.spec.model, self.spec.base_url, params, messages) + f":{answer_index}"
        hit = self.cache.get(key) if (self.cache is not None and cfg.cache) else None
        if hit is not None:
            if usage is not None:
                usage["cached_requests"] += 1
            return hit["text"], ""
        reason = "not attempted"
        for attempt in range(cfg.max_retries + 1):
            gate = LimiterGate(self.limiter, cfg.prices, self.spec.model, empty_usage() if usage is None else usage)
            try:
                res = await self._chat(gate, messages, response_format, {k: v for k, v in params.items()
                                                                        if k != "response_format"})
            except TransientError as exc:
                reason = exc.reason
                if usage is not None:
                    usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
                if exc.status == 429 and exc.retry_after:
                    await self.limiter.pause(exc.retry_after)
                if attempt < cfg.max_retries:
                    await asyncio.sleep(self._backoff(attempt, exc.retry_after))
                continue
            except PermanentError as exc:  # the budget ("budget") too
                if usage is not None and exc.reason != "budget":
                    usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
                return "", exc.reason
            if self.cache is not None and cfg.cache:
                self.cache.put(key, {"text": res.text, "prompt_tokens": res.prompt_tokens,
                                     "completion_tokens": res.completion_tokens})
            return res.text, ""
        return "", reason

    def _offline_unit(self, unit: WorkUnit) -> dict:
        rating, raw = self.backend.answer(unit)
        rows = [{"user_id": unit.user_id, "item_id": int(i), "rating": float(r), "raw": float(x),
                 "status": "ok", "reason": "", "attempts": 1, "repaired": False, "source": "offline"}
                for i, r, x in zip(unit.item_ids, rating, raw)]
        return {"unit_id": unit.unit_id, "rows": rows, "usage": empty_usage()}

    async def rate_unit(self, unit: WorkUnit) -> dict:
        if isinstance(self.backend, OfflineBackend):
            return self._offline_unit(unit)
        cfg, scale = self.cfg, unit.rating_scale
        self._backend()  # build the client before reserving a slot: a slow first build would bunch sends
        usage = empty_usage()
        ratings: dict[int, float] = {}
        repaired: set[int] = set()
        attempts = {i: 0 for i in unit.item_ids}
        reason = {i: "not attempted" for i in unit.item_ids}
        pending = list(unit.item_ids)
        answers_seen: dict[str, int] = {}
        budget_stop = permanent = False
        tries = 0
        while pending and tries <= cfg.max_retries and not budget_stop and not permanent:
            sub = unit.subset(pending)
            msgs = sub.messages()
            rf = rating_schema(sub.item_ids, scale)
            params = {"temperature": cfg.temperature, "max_tokens": cfg.max_output_tokens, "seed": cfg.seed,
                      "response_format": rf}
            base_key = request_key(self.spec.kind, self.spec.model, self.spec.base_url, params, msgs)
            # The n-th answer to the same prompt has its own key, so a rerun replays bad answers and
            # their retries exactly, for free; a resumed unit skips the answers earlier runs used.
            n = answers_seen.get(base_key, 0)
            key = f"{base_key}:{n + unit.answer_offset}"
            hit = self.cache.get(key) if (self.cache is not None and cfg.cache) else None
            for i in pending:
                attempts[i] += 1
            tries += 1
            if hit is not None:
                text = hit["text"]
                usage["cached_requests"] += 1
            else:
                gate = LimiterGate(self.limiter, cfg.prices, self.spec.model, usage)  # counts into usage
                try:
                    res = await self._chat(gate, msgs, rf, {k: v for k, v in params.items() if k != "response_format"})
                except BudgetExceeded:
                    budget_stop = True
                    for i in pending:
                        reason[i] = "budget"
                        attempts[i] -= 1
                    break
                except TransientError as exc:
                    usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
                    for i in pending:
                        reason[i] = exc.reason
                    if exc.status == 429 and exc.retry_after:
                        await self.limiter.pause(exc.retry_after)
                    if tries <= cfg.max_retries:
                        await asyncio.sleep(self._backoff(tries - 1, exc.retry_after))
                    continue
                except PermanentError as exc:
                    usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
                    for i in pending:
                        reason[i] = exc.reason
                    permanent = True
                    break
                text = res.text
                if self.cache is not None and cfg.cache:
                    self.cache.put(key, {"text": text, "prompt_tokens": res.prompt_tokens,
                                         "completion_tokens": res.completion_tokens})
            answers_seen[base_key] = n + 1
            parsed = parse_ratings(text, pending, scale)
            if parsed.parse == "failed":
                usage["errors"]["malformed_json"] = usage["errors"].get("malformed_json", 0) + 1
            for i, r in parsed.ratings.items():
                ratings[i] = r
            repaired.update(parsed.repaired)
            for i in parsed.missing:
                reason[i] = "malformed_json" if parsed.parse == "failed" else (
                    "truncated_json" if parsed.parse == "regex" else "missing_from_answer")
            for i, why in parsed.invalid.items():
                reason[i] = why
            pending = [i for i in pending if i not in ratings]
        rows = []
        for i in unit.item_ids:
            ok = i in ratings
            r = ratings.get(i, float("nan"))
            rows.append({"user_id": unit.user_id, "item_id": int(i), "rating": r, "raw": r,
                         "status": "ok" if ok else "failed", "reason": "" if ok else reason[i],
                         "attempts": attempts[i], "repaired": i in repaired, "source": self.spec.kind})
        return {"unit_id": unit.unit_id, "rows": rows, "usage": usage}


async def rate_units_local(engine: RatingEngine, units: list[WorkUnit], concurrency: int,
                           on_result: Callable[[WorkUnit, dict], None] | None = None) -> list[dict]:
    """Rate units in this process with bounded concurrency (tests, small jobs, the reward source)."""
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(u):
        async with sem:
            return u, await engine.rate_unit(u)

    out = []
    try:
        # Tasks start in order (as_completed alone would shuffle them), so shards finish in order.
        tasks = [asyncio.ensure_future(one(u)) for u in units]
        for fut in asyncio.as_completed(tasks):
            u, res = await fut
            if on_result is not None:
                on_result(u, res)
            out.append(res)
    finally:
        await engine.aclose()
    return out


def make_worker_class():
    import ray

    class PersonaWorker:
        def __init__(self, spec: BackendSpec, cfg: PersonaConfig, limiter_name: str | None, job: str,
                     cache_path: str | None, crash_marker: str | None = None, offline_model=None):
            from rlsim.personas.limiter import RayLimiter, get_limiter

            if spec.kind == "offline":
                # The fitted model arrives once per worker (ray.put by the driver, shared memory on a node).
                self.engine = RatingEngine(spec, cfg, None, None, backend=OfflineBackend(offline_model,
                                                                                           cfg.offline.snap))
            else:
                self.limiter = RayLimiter(get_limiter(limiter_name), job)
                cache = ResponseCache(cache_path) if cache_path else None
                self.engine = RatingEngine(spec, cfg, self.limiter, cache, rng=random.Random(cfg.seed + os.getpid()))
                self.engine._backend()  # import and build the HTTP client now, not inside the first paced slot
            self.crash_marker = crash_marker

        async def rate_unit(self, unit: WorkUnit) -> dict:
            # Test hook for crash recovery: the first unit seen after the marker appears kills the process.
            if self.crash_marker and os.path.exists(self.crash_marker):
                try:  # two workers may see the marker at once: only the one that removes it crashes
                    os.remove(self.crash_marker)
                except FileNotFoundError:
                    return await self.engine.rate_unit(unit)
                os._exit(1)
            return await self.engine.rate_unit(unit)

        async def ping(self) -> int:
            return os.getpid()

        async def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    return ray.remote(PersonaWorker)


def start_workers(spec: BackendSpec, cfg: PersonaConfig, limiter_name: str | None, job: str,
                  cache_path: str | None, crash_marker: str | None = None, offline_model_ref=None) -> list:
    cls = make_worker_class()
    # SPREAD: on a cluster the workers go to different nodes, so losing one node loses few of them
    # (a restarted worker lands wherever there is room; its retried units are idempotent and cached).
    return [cls.options(num_cpus=0, max_concurrency=cfg.max_concurrency, max_restarts=4, max_task_retries=4,
                        scheduling_strategy="SPREAD")
            .remote(spec, cfg, limiter_name, job, cache_path, crash_marker, offline_model_ref)
            for _ in range(cfg.n_workers)]


# ---------------------------------------------------------------- resumable jobs

# Units in flight per request slot (workers x max_concurrency): the dispatch window. Twice the slots
# keeps every worker busy while results come back; the driver holds the rows of the shards of those
# units only, never the run's.
IN_FLIGHT_PER_SLOT = 2
MANIFEST_EVERY_S = 1.0  # finished shards reach OUT/manifest.json at most this often (and at the end)
RATINGS_ROW_GROUP = 100_000  # rows per row group of OUT/ratings.parquet (what finish_job holds at once)
ROW_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("rating", pa.float64()),
                        ("raw", pa.float64()), ("status", pa.string()), ("reason", pa.string()),
                        ("attempts", pa.int64()), ("repaired", pa.bool_()), ("source", pa.string())])


def plan_shards(units: list[WorkUnit], shard_users: int) -> dict[str, list[WorkUnit]]:
    users = sorted({u.user_id for u in units})
    shard_of = {u: f"shard-{j // max(1, shard_users):05d}" for j, u in enumerate(users)}
    out: dict[str, list[WorkUnit]] = {}
    for u in units:
        out.setdefault(shard_of[u.user_id], []).append(u)
    return out


def plan_entry(unit_ids) -> str:
    """A shard's entry in the manifest's plan: '<units>:<digest of its sorted unit ids>' (the ids
    themselves would make the manifest as large as the run)."""
    ids = sorted(set(unit_ids))
    return f"{len(ids)}:{hashlib.sha1(chr(10).join(ids).encode()).hexdigest()[:16]}"


class JobPlan:
    """The shards of a job: ``shard_users`` consecutive users each (in id order), and their units,
    built when a shard's turn comes (a ``UnitSource``) or taken from a list."""

    def __init__(self, units: "list[WorkUnit] | UnitSource", shard_users: int):
        self.k = max(1, int(shard_users))
        if isinstance(units, UnitSource):
            self.source, self.lists = units, None
            self.users = units.users
        else:
            units = list(units)
            self.source = None
            self.lists = plan_shards(units, self.k)
            self.users = np.array(sorted({int(u.user_id) for u in units}), dtype=np.int64)
        self.names = [f"shard-{j:05d}" for j in range((len(self.users) + self.k - 1) // self.k)]
        self.index = {s: j for j, s in enumerate(self.names)}
        self.sizes: dict[str, int] = {}  # units per shard (with repeats), from entries()
        self.planned_pairs = 0

    def users_of(self, shard: str) -> np.ndarray:
        j = self.index[shard]
        return self.users[j * self.k:(j + 1) * self.k]

    def units(self, shard: str) -> list[WorkUnit]:
        if self.lists is not None:
            return self.lists.get(shard, [])
        return self.source.build(self.users_of(shard))

    def unit_ids(self, shard: str) -> list[tuple[str, int]]:
        if self.lists is not None:
            return [(u.unit_id, len(u.item_ids)) for u in self.lists.get(shard, [])]
        return self.source.unit_ids(self.users_of(shard))

    def entries(self) -> dict[str, str]:
        """The manifest's plan, one shard at a time; counts the planned pairs on the way."""
        plan, self.planned_pairs = {}, 0
        for s in self.names:
            ids = self.unit_ids(s)
            plan[s] = plan_entry(i for i, _ in ids)
            self.sizes[s] = len(ids)
            self.planned_pairs += sum(n for _, n in ids)
        return plan

    def shard_of_user(self, user_id: int) -> str | None:
        p = int(np.searchsorted(self.users, user_id))
        if p < len(self.users) and self.users[p] == user_id:
            return self.names[p // self.k]
        return None


def _clean_row(r: dict) -> dict:
    out = {k: r.get(k) for k in ROW_COLUMNS}
    for k in ("rating", "raw"):
        v = out[k]
        out[k] = None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)
    out["user_id"], out["item_id"], out["attempts"] = int(out["user_id"]), int(out["item_id"]), int(out["attempts"])
    out["repaired"] = bool(out["repaired"])
    return out


def _user_of_unit(unit_id: str) -> int:
    return int(unit_id.rsplit(":", 1)[0])


class Journal:
    """OUT/journal.jsonl: one line per finished unit (rows and usage), appended and flushed at once.

    A kill loses at most the units in flight; a torn last line is ignored (and closed with a
    newline before the next append). Reading it back gives each item's latest row (attempts add
    up over runs) and everything ever spent. Lines are fsynced one by one, or once per group
    inside ``batch()`` (the Ray loop: the results one wait returned).
    """

    def __init__(self, path: Path):
        self.path = path
        self._fh = None
        self._defer = False
        self._unsynced = False

    def entries(self):
        """Each readable line, in order (streamed: the journal of a large job is never held)."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill

    def load(self) -> tuple[dict[str, dict[int, dict]], dict, int]:
        """Everything at once (small jobs and tests; ``run_rating_job`` streams ``entries``)."""
        rows: dict[str, dict[int, dict]] = {}
        usage = empty_usage()
        n = 0
        for e in self.entries():
            n += 1
            usage = merge_usage(usage, e.get("usage", {}))
            merge_rows(rows.setdefault(e["unit_id"], {}), e["rows"])
        return rows, usage, n

    def append(self, unit_id: str, run: int, rows: list[dict], usage: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = False
            if self.path.is_file() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    torn = fh.read(1) != b"\n"
            self._fh = open(self.path, "a", encoding="utf-8")
            if torn:
                self._fh.write("\n")
        self._fh.write(json.dumps({"unit_id": unit_id, "run": run, "rows": [_clean_row(r) for r in rows],
                                   "usage": usage}) + "\n")
        self._fh.flush()  # in the OS's hands: a kill -9 of this process loses nothing written
        if self._defer:
            self._unsynced = True
        else:
            os.fsync(self._fh.fileno())

    def sync(self) -> None:
        if self._fh is not None and self._unsynced:
            os.fsync(self._fh.fileno())
        self._unsynced = False

    @contextlib.contextmanager
    def batch(self):
        """Appends inside are flushed at once and fsynced together at the end."""
        self._defer = True
        try:
            yield self
        finally:
            self._defer = False
            self.sync()

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None


def merge_rows(have: dict[int, dict], new_rows: list[dict]) -> None:
    """A newer row for an item replaces the older one; its attempts add to the earlier runs'."""
    for r in new_rows:
        r = _clean_row(r)
        old = have.get(r["item_id"])
        if old is not None:
            r["attempts"] += old["attempts"]
        have[r["item_id"]] = r


class SpendLedger:
    """OUT/spend.json: the job's spend as its limiter sees it (settled + reserved), rewritten by the
    limiter at every reservation and settlement (``RateLimiter.register(ledger=...)``)."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> float:
        if not self.path.is_file():
            return 0.0
        try:
            d = read_json(self.path)
        except (OSError, json.JSONDecodeError):
            return 0.0
        # Reservations of a killed run may have been sent: they count (a hard cap errs on the safe side).
        return float(d.get("spent_usd", 0.0)) + float(d.get("reserved_usd", 0.0))


@dataclasses.dataclass
class Replay:
    """What a rerun takes from the journal: the rows of shards not safely in their Parquet files,
    journal lines per shard, and everything ever spent."""

    state: dict[str, dict[int, dict]]
    lines: dict[str, int]
    usage: dict
    final: set[str]  # done, checked against the journal, nothing left to retry: not opened again
    in_file: set[str]  # done and checked, with transient failures to retry: rows come from the Parquet
    rows_kept: int = 0  # rows of the journal held after the replay


def replay_journal(journal: Journal, plan: JobPlan, manifest: dict, out_dir: Path) -> Replay:
    """Stream the journal once, keeping only the rows of shards that need them.

    A shard recorded as done in the manifest, whose Parquet file is there and whose number of
    journal lines is the one recorded when the file was written, is taken from the file: its lines
    are counted, not kept. Any other shard (not done; killed before the manifest was written; a
    torn or missing journal line; a folder from before the count was recorded) gets its rows from
    the journal, as before (a second pass when a count does not match).
    """
    done = {s: e for s, e in manifest["shards"].items()
            if s in plan.index and e.get("status") == "done" and "journal_lines" in e
            and (out_dir / e.get("file", "-")).is_file()}
    state: dict[str, dict[int, dict]] = {}
    lines: dict[str, int] = {}
    usage = empty_usage()

    def stream(keep) -> None:
        nonlocal usage
        for e in journal.entries():
            s = plan.shard_of_user(_user_of_unit(e["unit_id"]))
            if keep is None:
                usage = merge_usage(usage, e.get("usage", {}))
                if s is not None:
                    lines[s] = lines.get(s, 0) + 1
            if s is not None and (s not in done if keep is None else s in keep):
                merge_rows(state.setdefault(e["unit_id"], {}), e["rows"])

    stream(None)
    suspect = {s for s, e in done.items() if lines.get(s, 0) != e["journal_lines"]}
    if suspect:
        log.info("%d finished shards differ from the journal; their rows are read from it", len(suspect))
        for s in suspect:
            del done[s]
        stream(suspect)
    final = {s for s, e in done.items() if int(e.get("retryable", 1)) == 0}
    return Replay(state, lines, usage, final, set(done) - final, sum(len(v) for v in state.values()))


class ShardWriter:
    """Records each finished unit in the journal at once; holds the rows of open shards only (those
    with units in flight or not yet sent); writes a shard's Parquet when its units are in, records it
    in the manifest and drops its rows.

    ``todo()`` opens the shards in order and yields (planned unit, what is left of it): the units of
    a shard are built when its turn comes. ``max_open_shards``, ``max_rows_held`` and
    ``max_in_flight`` (set by the runners) are probes of what the driver held at most.
    """

    def __init__(self, out_dir: Path, plan: JobPlan, manifest: dict, journal: Journal, replay: Replay):
        self.out_dir = out_dir
        self.plan = plan
        self.manifest = manifest
        self.journal = journal
        self.replay = replay
        self.state = replay.state
        self.lines = replay.lines
        self.run = int(manifest.get("resumed", 0))
        self.open: dict[str, dict] = {}  # shard -> {"units": [...], "waiting": {unit ids}}
        self.usage = empty_usage()
        self.retried = 0
        self.rows_held = sum(len(v) for v in self.state.values())
        self.max_rows_held = self.rows_held
        self.max_open_shards = 0
        self.max_in_flight = 0
        self.shards_written = 0
        self._saved_at = 0.0

    # ------------------------------------------------------------ opening shards
    def units_to_rate(self) -> int:
        """Planned units of the shards that are opened (an upper bound of what is sent)."""
        return sum(self.plan.sizes.get(s, 0) for s in self.plan.names if s not in self.replay.final)

    def todo(self, skipped: Callable[[int], None] | None = None):
        for s in self.plan.names:
            if s in self.replay.final:
                continue
            units = self.plan.units(s)
            if s in self.replay.in_file:
                self._load_from_file(s, units)
            todo = []
            for u in units:
                have = self.state.get(u.unit_id, {})
                left = [i for i in u.item_ids if i not in have or not is_final(have[i]["status"], have[i]["reason"])]
                if not left:
                    continue
                again = [i for i in left if i in have]
                self.retried += len(again)
                sub = u if len(left) == len(u.item_ids) else u.subset(left)
                # Skip the cached answers earlier runs already used for these items (asked again, not replayed).
                offset = max((have[i]["attempts"] for i in again), default=0)
                if offset:
                    sub = dataclasses.replace(sub, answer_offset=u.answer_offset + offset)
                todo.append((u, sub))
            self.open[s] = {"units": units, "waiting": {u.unit_id for u, _ in todo}}
            self.max_open_shards = max(self.max_open_shards, len(self.open))
            if skipped is not None and len(units) > len(todo):
                skipped(len(units) - len(todo))
            if not todo:
                self._write_shard(s)  # complete in the journal, but its Parquet was not written (or is stale)
                continue
            if self.manifest["shards"].pop(s, None) is not None:
                self._save_manifest()  # written again when its work is done
            yield from todo

    def _load_from_file(self, s: str, units: list[WorkUnit]) -> None:
        """A done shard's rows from its Parquet (what the journal holds for it: the counts matched)."""
        df = pd.read_parquet(self.out_dir / self.manifest["shards"][s]["file"])
        by_pair: dict[tuple[int, int], list[dict]] = {}
        for r in df.to_dict("records"):
            by_pair.setdefault((int(r["user_id"]), int(r["item_id"])), []).append(_clean_row(r))
        for u in units:
            rows = {}
            for i in u.item_ids:
                got = by_pair.get((int(u.user_id), int(i)))
                if got:
                    rows[int(i)] = got.pop(0)  # a pair in two units: the file has both rows, in unit order
            if rows:
                self.state[u.unit_id] = rows
                self._held(len(rows))

    # ------------------------------------------------------------ results
    def add(self, unit: WorkUnit, res: dict) -> None:
        self.journal.append(unit.unit_id, self.run, res["rows"], res["usage"])
        have = self.state.setdefault(unit.unit_id, {})
        n = len(have)
        merge_rows(have, res["rows"])
        self._held(len(have) - n)
        self.usage = merge_usage(self.usage, res["usage"])
        s = self.plan.shard_of_user(unit.user_id)
        self.lines[s] = self.lines.get(s, 0) + 1
        sh = self.open[s]
        sh["waiting"].discard(unit.unit_id)  # a retried unit overwrites itself: no duplicates
        if not sh["waiting"]:
            self._write_shard(s)

    def _held(self, n: int) -> None:
        self.rows_held += n
        self.max_rows_held = max(self.max_rows_held, self.rows_held)

    def rows_of(self, shard: str) -> pd.DataFrame:
        units = self.open[shard]["units"] if shard in self.open else self.plan.units(shard)
        rows = [r for u in units for r in self.state.get(u.unit_id, {}).values()]
        df = pd.DataFrame(rows, columns=ROW_COLUMNS)
        df["rating"] = df["rating"].astype(float)
        df["raw"] = df["raw"].astype(float)
        return df.sort_values(["user_id", "item_id"], kind="stable").reset_index(drop=True)

    def _write_shard(self, s: str) -> None:
        df = self.rows_of(s)
        fname = f"{s}.parquet"
        write_parquet(df, self.out_dir / "shards" / fname)
        failed = df["status"] != "ok"
        retryable = int(sum(not is_final(st, r) for st, r in zip(df["status"], df["reason"])))
        self.manifest["shards"][s] = {"status": "done", "file": f"shards/{fname}", "rows": len(df),
                                      "failed": int(failed.sum()), "retryable": retryable,
                                      "journal_lines": self.lines.get(s, 0)}
        for u in self.open.pop(s, {"units": []})["units"]:
            self._held(-len(self.state.pop(u.unit_id, {})))
        self.shards_written += 1
        self._save_manifest()

    def _save_manifest(self, force: bool = False) -> None:
        """At most every MANIFEST_EVERY_S: the journal is the record, the manifest a summary of it that
        a resume checks (a shard finished since the last write is taken from the journal)."""
        now = time.monotonic()
        if force or now - self._saved_at >= MANIFEST_EVERY_S:
            write_json(self.out_dir / "manifest.json", self.manifest)
            self._saved_at = now


def job_identity(spec: BackendSpec, cfg: PersonaConfig, context: dict | None = None) -> dict:
    """What must match for a rerun into the same folder to resume (never the key, budget or limits)."""
    from rlsim.personas.prompts import rating_prompts_sha256

    ident = {"format": JOB_FORMAT, **spec.cache_identity(), "batch_size": cfg.batch_size,
             "k_similar": cfg.k_similar, "profile": cfg.profile, "temperature": cfg.temperature,
             "max_output_tokens": cfg.max_output_tokens, "seed": cfg.seed, "prompts_sha256": rating_prompts_sha256()}
    if spec.kind == "offline":
        ident = {"format": JOB_FORMAT, "backend": "offline", "offline": dict(vars(cfg.offline))}
    return {**ident, **(context or {})}


def load_manifest(out_dir: Path, plan: dict[str, str], identity: dict) -> dict:
    p = out_dir / "manifest.json"
    if p.is_file():
        m = read_json(p)
        old = m.get("identity") or {}
        # A folder written before plans were digests lists each shard's unit ids.
        m["plan"] = {s: plan_entry(v) if isinstance(v, list) else v for s, v in (m.get("plan") or {}).items()}
        if m.get("plan") != plan or old != identity:
            keys = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            # A folder from before the prompts digest / text model were part of the identity cannot
            # show they match: refused like any other older job, saying so.
            older = "format" in keys or any(k in IDENTITY_ADDED and k not in old for k in keys)
            what = ("the pairs (users or items) differ" if m.get("plan") != plan else
                    older and f"it was written by an older rlsim ({', '.join(keys)} differ)"
                    or f"{', '.join(keys)} differ")
            raise ConfigError(f"{out_dir} holds a different rating job ({what}); use a new --out folder")
        m["resumed"] = m.get("resumed", 0) + 1
        return m
    return {"plan": plan, "identity": identity, "shards": {}, "resumed": 0, "created": time.time()}


def _job_key(out_dir: Path, identity: dict) -> str:
    blob = json.dumps({"out": str(out_dir.resolve()), "identity": identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    writer._save_manifest(force=True)
    job = {"key": _job_key(out_dir, identity), "spent_before": spent_before}
    limits: dict = {"rpm": cfg.rpm, "tpm": cfg.tpm, "scope": "none (offline)" if spec.kind == "offline" else
                    ("cluster" if use_ray else "this process")}
    bar = _bar(writer.units_to_rate(), progress)
    todo = writer.todo(skipped=bar.update)
    t0 = time.time()
    try:
        if use_ray:
            limits.update(_run_ray(todo, writer, spec, cfg, cache_path, job, bar, crash_marker, offline_model,
                                   ledger))
        else:
            _run_local(todo, writer, spec, cfg, cache_path, job, bar, offline_model, ledger)
    finally:
        journal.close()
        bar.close()
        writer._save_manifest(force=True)  # what finished before an interrupt is recorded
        if probe is not None:
            probe.update(max_open_shards=writer.max_open_shards, max_rows_held=writer.max_rows_held,
                         max_in_flight=writer.max_in_flight, shards_written=writer.shards_written,
                         replayed_rows=replay.rows_kept, final_shards=len(replay.final),
                         shards_from_files=len(replay.in_file))
    summary = finish_job(out_dir, plan, manifest, writer, time.time() - t0, usage_before, spent_before,
                         writer.retried, limits)
    return summary


def dispatch_window(cfg: PersonaConfig) -> int:
    """Units in flight at most: IN_FLIGHT_PER_SLOT per request slot of the pool."""
    return max(1, IN_FLIGHT_PER_SLOT * cfg.n_workers * cfg.max_concurrency)


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


class SlotDealer:
    """The worker of each unit, in dispatch order: round robin, or (a backend with memory) one worker
    per user, users dealt in turn. ``shard`` (optional): a user's units all come within their shard,
    so what is remembered of users is dropped when the shard changes."""

    def __init__(self, n_workers: int, by_user: bool):
        self.n, self.by_user = max(1, n_workers), by_user
        self.j = 0
        self.users_dealt = 0
        self.user_slot: dict[int, int] = {}
        self.shard = None

    def slot(self, unit: WorkUnit, shard=None) -> int:
        if not self.by_user:
            self.j += 1
            return (self.j - 1) % self.n
        if shard is not None and shard != self.shard:
            self.shard, self.user_slot = shard, {}
        s = self.user_slot.get(unit.user_id)
        if s is None:
            s = self.user_slot[unit.user_id] = self.users_dealt % self.n
            self.users_dealt += 1
        return s


def _worker_slots(units: list[WorkUnit], n_workers: int, by_user: bool) -> list[int]:
    """Worker of each unit: round robin, or (a backend with memory) one worker per user, users dealt in turn."""
    d = SlotDealer(n_workers, by_user)
    return [d.slot(u) for u in units]


def _run_ray(todo, writer, spec, cfg, cache_path, job, bar, crash_marker, offline_model, ledger) -> dict:
    import ray

    from rlsim.personas.limiter import cluster_limiter, limiter_name

    handle = name = None
    info: dict = {}
    if spec.kind != "offline":
        name = limiter_name(spec.base_url, spec.model)
        handle = cluster_limiter(name)
        reg = ray.get(handle.register.remote(job["key"], cfg.rpm, cfg.tpm, cfg.budget_usd, job["spent_before"],
                                             None, str(ledger.path.resolve())))
        info = {"limiter": name, "job": job["key"], "effective_rpm": reg["rpm"], "effective_tpm": reg["tpm"],
                "other_jobs": reg["other_jobs"]}
        if reg["stricter_elsewhere"]:
            info["note"] = (f"another job on this cluster asked for stricter limits: this job runs at "
                            f"{reg['rpm']:g} requests/min and {reg['tpm']:g} tokens/min (asked {cfg.rpm:g} and "
                            f"{cfg.tpm:g})")
            log.warning(info["note"])
    model_ref = ray.put(offline_model) if offline_model is not None else None
    workers = start_workers(spec, cfg, name, job["key"], cache_path, crash_marker, model_ref)
    info["worker_nodes"] = ray.get([w.node.remote() for w in workers])
    try:
        # A window of units in flight, refilled as results come back (never the whole run at once).
        # A backend with memory (TinyTroupe: one agent per user) meets each user on one worker.
        window = dispatch_window(cfg)
        dealer = SlotDealer(len(workers), by_user=keeps_memory(spec))
        pending: dict = {}
        it = iter(todo)
        while True:
            for u, sub in itertools.islice(it, max(0, window - len(pending))):  # refill the window
                w = workers[dealer.slot(sub, writer.plan.shard_of_user(sub.user_id))]
                pending[w.rate_unit.remote(sub)] = u
            writer.max_in_flight = max(writer.max_in_flight, len(pending))
            if not pending:
                break
            refs = list(pending)
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # every result that is in
            if not done:
                done, _ = ray.wait(refs, num_returns=1, timeout=1.0)
                if not done:
                    continue
            results = ray.get(done)
            with writer.journal.batch():  # one fsync for the results of one wait
                for r, res in zip(done, results):
                    writer.add(pending.pop(r), res)
                    bar.update(1)
    finally:
        for w in workers:
            ray.kill(w)
        if handle is not None:
            try:
                st = ray.get(handle.job_stats.remote(job["key"]), timeout=30)
                info.update({"min_rpm_seen": st["min_rpm"], "min_tpm_seen": st["min_tpm"]})
                if st["min_rpm"] is not None and (st["min_rpm"] < cfg.rpm or st["min_tpm"] < cfg.tpm) \
                        and "note" not in info:
                    info["note"] = (f"another job on this cluster asked for stricter limits while this one ran: "
                                    f"down to {st['min_rpm']:g} requests/min and {st['min_tpm']:g} tokens/min")
                ray.get(handle.unregister.remote(job["key"]), timeout=30)
            except Exception as exc:  # noqa: BLE001 - the limiter is best effort at the very end
                log.warning("could not read the limiter's final state: %s", exc)
    return info


def _not_final_mask(status: pd.Series, reason: pd.Series) -> np.ndarray:
    """``not is_final(status, reason)`` for columns."""
    r = reason.fillna("").astype(str)
    final = (status == "ok") | (r.str.startswith("http_4") & ~r.isin(RETRY_ON_RESUME_4XX))
    return ~final.to_numpy(bool)


def stream_ratings(out_dir: Path, plan: JobPlan, manifest: dict, path: Path) -> dict:
    """Concatenate the shard files (in plan order: users ascending, each sorted by user and item)
    into one Parquet at ``path``, a row group at a time; returns the counts of the summary."""
    counts = {"pairs": 0, "rated": 0, "failed": 0, "retryable_failed": 0, "duplicates": 0}
    reasons: dict[str, int] = {}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    buf: list[pa.Table] = []
    held = 0
    with pq.ParquetWriter(tmp, ROW_SCHEMA) as w:
        for s in plan.names:
            e = manifest["shards"].get(s)
            if e is None or not (out_dir / e["file"]).is_file():
                continue
            t = pq.read_table(out_dir / e["file"], columns=ROW_COLUMNS)
            t = pa.Table.from_arrays([t.column(c).cast(ROW_SCHEMA.field(c).type) for c in ROW_COLUMNS],
                                     schema=ROW_SCHEMA)
            df = t.select(["user_id", "item_id", "status", "reason"]).to_pandas()
            failed = (df["status"] != "ok").to_numpy(bool)
            counts["pairs"] += len(df)
            counts["failed"] += int(failed.sum())
            counts["rated"] += int((~failed).sum())
            counts["retryable_failed"] += int(_not_final_mask(df["status"], df["reason"]).sum())
            # Shards split the users, so a pair can only repeat within one.
            counts["duplicates"] += int(df.duplicated(["user_id", "item_id"]).sum())
            for k, v in df.loc[failed, "reason"].value_counts(sort=False).items():
                reasons[k] = reasons.get(k, 0) + int(v)
            buf.append(t)
            held += t.num_rows
            if held >= RATINGS_ROW_GROUP:
                w.write_table(pa.concat_tables(buf), row_group_size=RATINGS_ROW_GROUP)
                buf, held = [], 0
        if buf or counts["pairs"] == 0:
            w.write_table(pa.concat_tables(buf) if buf else ROW_SCHEMA.empty_table(),
                          row_group_size=RATINGS_ROW_GROUP)
    tmp.replace(path)
    counts["failure_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    return counts


def finish_job(out_dir: Path, plan: JobPlan, manifest: dict, writer: ShardWriter, elapsed_s: float,
               usage_before: dict, spent_before: float, retried: int, limits: dict) -> dict:
    """OUT/ratings.parquet streamed from the shard files, and the summary counted on the way (never
    a frame of the whole run)."""
    c = stream_ratings(out_dir, plan, manifest, out_dir / "ratings.parquet")
    planned = plan.planned_pairs
    usage = merge_usage(usage_before, writer.usage)
    summary = {"pairs": c["pairs"], "planned_pairs": planned, "missing_pairs": planned - c["pairs"],
               "rated": c["rated"], "failed": c["failed"], "failure_reasons": c["failure_reasons"],
               "retryable_failed": c["retryable_failed"], "retried": retried, "duplicates": c["duplicates"],
               "usage": usage, "usage_this_run": writer.usage,
               "spent_usd": max(float(usage["cost_usd"]), spent_before + float(writer.usage["cost_usd"])),
               "elapsed_s": elapsed_s, "resumed": manifest.get("resumed", 0),
               "shards": len(manifest["shards"]), "planned_shards": len(manifest["plan"]), "limits": limits}
    manifest["summary"] = summary
    write_json(out_dir / "manifest.json", manifest)
    return summary


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


# ---------------------------------------------------------------- reward source for the RL env

class PersonaRewardSource:
    """score(user_ids, item_ids) -> float ratings (NaN when the persona failed), like RewardSource.

    Wrap with ``ray.remote(PersonaRewardSource)`` to share one instance between env runners.
    """

    def __init__(self, builder, spec: BackendSpec | None, cfg: PersonaConfig, cache_path: str | None = None,
                 offline_model=None, scale=None):
        self.scale = scale  # the RewardSource protocol's rating scale
        self.builder = builder
        self.spec = spec
        self.cfg = cfg
        self.offline = offline_model
        if offline_model is None:
            check_backend(spec)
            self.engine = RatingEngine(spec, cfg, LocalLimiter(RateLimiter(cfg.rpm, cfg.tpm, cfg.budget_usd)),
                                       ResponseCache(cache_path) if cache_path else None)

    def score(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        user_ids, item_ids = np.asarray(user_ids), np.asarray(item_ids)
        if self.offline is not None:
            return np.asarray(self.offline.predict(user_ids, item_ids), float)
        pairs = pd.DataFrame({"user_id": user_ids, "item_id": item_ids})
        units = self.builder.units(pairs.drop_duplicates())
        results = asyncio.run(rate_units_local(self.engine, units, self.cfg.max_concurrency))
        got = {(r["user_id"], r["item_id"]): r["rating"] for x in results for r in x["rows"]}
        return np.array([got.get((int(u), int(i)), np.nan) for u, i in zip(user_ids, item_ids)], float)
