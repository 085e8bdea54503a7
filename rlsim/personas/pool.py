"""Rating engine, Ray actor pool, sharded resumable jobs, and the persona reward source.

- ``RatingEngine.rate_unit``: one work unit -> one row per (user, item): a rating or a failure
  with its reason. Cache first; else reserve capacity from the shared limiter (rate and budget),
  call the backend, validate, retry what is missing with backoff + jitter.
- ``PersonaWorker``: an async Ray actor wrapping an engine (bounded by max_concurrency), restarted
  after a crash; its tasks are retried, which is safe because units are idempotent and cached.
- ``run_rating_job``: shards users, writes one Parquet per finished shard plus manifest.json, so a
  killed job resumes at the first unfinished shard without duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from rlsim.errors import ConfigError
from rlsim.io import read_json, write_json, write_parquet
from rlsim.personas.backends import (BackendSpec, BudgetExceeded, ChatResult, PermanentError, TransientError,
                                     build_backend, check_backend, keeps_memory)
from rlsim.personas.cache import ResponseCache, request_key
from rlsim.personas.config import PersonaConfig
from rlsim.personas.cost import cost_usd
from rlsim.personas.gate import LimiterGate
from rlsim.personas.grounding import WorkUnit
from rlsim.personas.limiter import LocalLimiter, RateLimiter
from rlsim.personas.prompts import estimate_tokens, messages_tokens, rating_schema
from rlsim.personas.validate import parse_ratings

log = logging.getLogger(__name__)

ROW_COLUMNS = ["user_id", "item_id", "rating", "status", "reason", "attempts", "repaired", "source"]


def completion_estimate(n_items: int) -> int:
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
        self.backend = None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** attempt))
        delay = base * (0.5 + self.rng.random())  # jitter: callers do not retry in lockstep
        return max(delay, retry_after or 0.0)

    async def complete(self, messages: list[dict], response_format: dict | None) -> str:
        """One cached, rate-limited, retried free-form call (profiles); '' when it never succeeded."""
        cfg = self.cfg
        params = {"temperature": cfg.temperature, "max_tokens": max(cfg.max_output_tokens, 600), "seed": cfg.seed,
                  "response_format": response_format}
        key = request_key(self.spec.kind, self.spec.model, self.spec.base_url, params, messages) + ":0"
        hit = self.cache.get(key) if (self.cache is not None and cfg.cache) else None
        if hit is not None:
            return hit["text"]
        for attempt in range(cfg.max_retries + 1):
            gate = LimiterGate(self.limiter, cfg.prices, self.spec.model, empty_usage())
            try:
                res = await self._chat(gate, messages, response_format, {k: v for k, v in params.items()
                                                                        if k != "response_format"}, 300)
            except TransientError as exc:
                if exc.status == 429 and exc.retry_after:
                    await self.limiter.pause(exc.retry_after)
                await asyncio.sleep(self._backoff(attempt, exc.retry_after))
                continue
            except PermanentError:  # the budget too
                return ""
            if self.cache is not None and cfg.cache:
                self.cache.put(key, {"text": res.text, "prompt_tokens": res.prompt_tokens,
                                     "completion_tokens": res.completion_tokens})
            return res.text
        return ""

    async def _chat(self, gate: LimiterGate, messages: list[dict], response_format: dict | None, params: dict,
                    completion_tokens: int) -> ChatResult:
        """One answer. The gate reserves and counts each HTTP request: here around ``chat``, or inside a
        gated backend around each request it sends (TinyTroupe sends several per answer)."""
        backend = self._backend()
        if getattr(backend, "gated", False):
            return await backend.chat(messages, response_format, params, gate=gate)
        reserved = await gate.acquire(messages_tokens(messages), completion_tokens)
        try:
            res = await backend.chat(messages, response_format, params)
        except Exception:  # failed: nothing to charge
            await gate.release(reserved, 0, 0)
            raise
        await gate.release(reserved, res.prompt_tokens, res.completion_tokens)
        return res

    async def rate_unit(self, unit: WorkUnit) -> dict:
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
            # their retries exactly, for free.
            n = answers_seen.get(base_key, 0)
            key = f"{base_key}:{n}"
            hit = self.cache.get(key) if (self.cache is not None and cfg.cache) else None
            for i in pending:
                attempts[i] += 1
            tries += 1
            if hit is not None:
                text = hit["text"]
                usage["cached_requests"] += 1
            else:
                gate = LimiterGate(self.limiter, cfg.prices, self.spec.model, usage)
                try:
                    res = await self._chat(gate, msgs, rf, {k: v for k, v in params.items() if k != "response_format"},
                                           completion_estimate(len(pending)))
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
            rows.append({"user_id": unit.user_id, "item_id": int(i), "rating": ratings.get(i, float("nan")),
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
        def __init__(self, spec: BackendSpec, cfg: PersonaConfig, limiter_name: str, namespace: str | None,
                     cache_path: str | None, crash_marker: str | None = None):
            from rlsim.personas.limiter import RayLimiter

            self.limiter = RayLimiter(ray.get_actor(limiter_name, namespace=namespace))
            cache = ResponseCache(cache_path) if cache_path else None
            self.engine = RatingEngine(spec, cfg, self.limiter, cache, rng=random.Random(cfg.seed + os.getpid()))
            self.engine._backend()  # import and build the HTTP client now, not inside the first paced slot
            self.crash_marker = crash_marker

        async def rate_unit(self, unit: WorkUnit) -> dict:
            # Test hook for crash recovery: the first unit seen after the marker appears kills the process.
            if self.crash_marker and os.path.exists(self.crash_marker):
                os.remove(self.crash_marker)
                os._exit(1)
            return await self.engine.rate_unit(unit)

        async def ping(self) -> int:
            return os.getpid()

    return ray.remote(PersonaWorker)


def start_workers(spec: BackendSpec, cfg: PersonaConfig, limiter_name: str, namespace: str | None,
                  cache_path: str | None, crash_marker: str | None = None) -> list:
    cls = make_worker_class()
    return [cls.options(num_cpus=0, max_concurrency=cfg.max_concurrency, max_restarts=4, max_task_retries=4)
            .remote(spec, cfg, limiter_name, namespace, cache_path, crash_marker) for _ in range(cfg.n_workers)]


# ---------------------------------------------------------------- sharded, resumable jobs

def plan_shards(units: list[WorkUnit], shard_users: int) -> dict[str, list[WorkUnit]]:
    users = sorted({u.user_id for u in units})
    shard_of = {u: f"shard-{j // max(1, shard_users):05d}" for j, u in enumerate(users)}
    out: dict[str, list[WorkUnit]] = {}
    for u in units:
        out.setdefault(shard_of[u.user_id], []).append(u)
    return out


class ShardWriter:
    """Collects unit results per shard; writes a shard's Parquet and the manifest when it is complete."""

    def __init__(self, out_dir: Path, shards: dict[str, list[WorkUnit]], manifest: dict):
        self.out_dir = out_dir
        self.expected = {s: {u.unit_id for u in us} for s, us in shards.items()}
        self.shard_of = {u.unit_id: s for s, us in shards.items() for u in us}
        self.results: dict[str, dict[str, dict]] = {s: {} for s in shards}
        self.manifest = manifest

    def add(self, unit: WorkUnit, res: dict) -> None:
        s = self.shard_of[unit.unit_id]
        self.results[s][unit.unit_id] = res  # a retried unit overwrites itself: no duplicates
        if set(self.results[s]) == self.expected[s]:
            rows = [r for x in self.results[s].values() for r in x["rows"]]
            df = pd.DataFrame(rows, columns=ROW_COLUMNS).sort_values(["user_id", "item_id"])
            fname = f"{s}.parquet"
            write_parquet(df, self.out_dir / "shards" / fname)
            usage = empty_usage()
            for x in self.results[s].values():
                usage = merge_usage(usage, x["usage"])
            self.manifest["shards"][s] = {"status": "done", "file": f"shards/{fname}", "rows": len(df),
                                          "failed": int((df["status"] != "ok").sum()), "usage": usage}
            write_json(self.out_dir / "manifest.json", self.manifest)
            del self.results[s]


def load_manifest(out_dir: Path, plan: dict[str, list[int]], identity: dict) -> dict:
    p = out_dir / "manifest.json"
    if p.is_file():
        m = read_json(p)
        if m.get("plan") != plan or m.get("identity") != identity:
            raise ConfigError(f"{out_dir} holds a different rating job (users, items or backend differ); "
                              "use a new --out folder")
        m["shards"] = {s: v for s, v in m.get("shards", {}).items()
                       if v.get("status") == "done" and (out_dir / v["file"]).is_file()}
        m["resumed"] = m.get("resumed", 0) + 1
        return m
    return {"plan": plan, "identity": identity, "shards": {}, "resumed": 0, "created": time.time()}


def spent_usd(manifest: dict) -> float:
    return float(sum(v["usage"]["cost_usd"] for v in manifest["shards"].values()))


def run_rating_job(units: list[WorkUnit], out_dir: str | Path, spec: BackendSpec, cfg: PersonaConfig,
                   cache_path: str | None, use_ray: bool = True, progress: bool = True,
                   crash_marker: str | None = None) -> dict:
    """Rate all units; returns the summary (also written to OUT/manifest.json and OUT/ratings.parquet)."""
    check_backend(spec)  # a broken install is one ConfigError here, not a traceback per worker or task
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(units, cfg.shard_users)
    plan = {s: sorted({u.unit_id for u in us}) for s, us in shards.items()}
    identity = {**spec.cache_identity(), "batch_size": cfg.batch_size, "k_similar": cfg.k_similar,
                "profile": cfg.profile}
    manifest = load_manifest(out_dir, plan, identity)
    write_json(out_dir / "manifest.json", manifest)
    todo = {s: us for s, us in shards.items() if s not in manifest["shards"]}
    budget_left = None if cfg.budget_usd is None else max(0.0, cfg.budget_usd - spent_usd(manifest))
    writer = ShardWriter(out_dir, todo, manifest)
    todo_units = [u for us in todo.values() for u in us]
    bar = _bar(len(todo_units), progress)
    t0 = time.time()
    if todo_units:
        if use_ray:
            _run_ray(todo_units, writer, spec, cfg, cache_path, budget_left, bar, crash_marker)
        else:
            limiter = LocalLimiter(RateLimiter(cfg.rpm, cfg.tpm, budget_left))
            cache = ResponseCache(cache_path) if cache_path else None
            engine = RatingEngine(spec, cfg, limiter, cache)

            def on_result(u, res):
                writer.add(u, res)
                bar.update(1)

            asyncio.run(rate_units_local(engine, todo_units, cfg.max_concurrency * cfg.n_workers, on_result))
    bar.close()
    return finish_job(out_dir, manifest, time.time() - t0)


def _bar(n: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=n, desc="persona units", disable=not progress, unit="req")


def _worker_slots(units: list[WorkUnit], n_workers: int, by_user: bool) -> list[int]:
    """Worker of each unit: round robin, or (a backend with memory) one worker per user, users dealt in turn."""
    if not by_user:
        return [j % n_workers for j in range(len(units))]
    user_slot: dict[int, int] = {}
    return [user_slot.setdefault(u.user_id, len(user_slot) % n_workers) for u in units]


def _run_ray(units, writer, spec, cfg, cache_path, budget_left, bar, crash_marker) -> None:
    import ray

    from rlsim.personas.limiter import limiter_actor

    ns = ray.get_runtime_context().namespace
    name = f"rlsim_persona_limiter_{os.getpid()}_{int(time.time() * 1000)}"
    lim = limiter_actor(cfg.rpm, cfg.tpm, budget_left, name=name, namespace=ns)
    workers = start_workers(spec, cfg, name, ns, cache_path, crash_marker)
    try:
        refs = {}
        slot = _worker_slots(units, len(workers), by_user=keeps_memory(spec))
        for j, u in enumerate(units):
            refs[workers[slot[j]].rate_unit.remote(u)] = u
        while refs:
            done, _ = ray.wait(list(refs), num_returns=min(len(refs), 64), timeout=1.0)
            for r in done:
                u = refs.pop(r)
                writer.add(u, ray.get(r))
                bar.update(1)
    finally:
        for w in workers:
            ray.kill(w)
        ray.kill(lim)


def finish_job(out_dir: Path, manifest: dict, elapsed_s: float) -> dict:
    files = [out_dir / v["file"] for _, v in sorted(manifest["shards"].items())]
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else \
        pd.DataFrame(columns=ROW_COLUMNS)
    write_parquet(df, out_dir / "ratings.parquet")
    usage = empty_usage()
    for v in manifest["shards"].values():
        usage = merge_usage(usage, v["usage"])
    reasons = df.loc[df["status"] != "ok", "reason"].value_counts().to_dict() if len(df) else {}
    summary = {"pairs": int(len(df)), "rated": int((df["status"] == "ok").sum()) if len(df) else 0,
               "failed": int((df["status"] != "ok").sum()) if len(df) else 0, "failure_reasons": reasons,
               "duplicates": int(df.duplicated(["user_id", "item_id"]).sum()) if len(df) else 0,
               "usage": usage, "elapsed_s": elapsed_s, "resumed": manifest.get("resumed", 0),
               "shards": len(manifest["shards"]), "planned_shards": len(manifest["plan"])}
    manifest["summary"] = summary
    write_json(out_dir / "manifest.json", manifest)
    return summary


def dry_run(units: list[WorkUnit], spec: BackendSpec, cfg: PersonaConfig) -> dict:
    """Tokens and dollars the job would use if every unit were answered on the first try."""
    p = sum(messages_tokens(u.messages()) for u in units)
    c = sum(completion_estimate(len(u.item_ids)) for u in units)
    n_items = sum(len(u.item_ids) for u in units)
    return {"requests": len(units), "pairs": n_items, "prompt_tokens": p, "completion_tokens": c,
            "prompt_tokens_per_rating": p / max(1, n_items), "model": spec.model,
            "cost_usd": cost_usd(cfg.prices, spec.model, p, c), "budget_usd": cfg.budget_usd,
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
