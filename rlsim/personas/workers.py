"""The Ray side of a rating job. ``PersonaWorker``: an async Ray actor wrapping an engine (bounded by
max_concurrency), restarted after a crash; its tasks are retried, which is safe because units are
idempotent and cached. Units go round robin; with a backend that remembers (TinyTroupe: one agent
per user) all of a user's units go to one worker (``SlotDealer``). ``run_ray`` feeds them a window
of units, paced by the cluster's limiter of the endpoint."""

from __future__ import annotations

import itertools
import logging
import os
import random

from rlsim.personas.backends import BackendSpec
from rlsim.personas.backends.factory import keeps_memory
from rlsim.personas.backends.offline import OfflineBackend
from rlsim.personas.cache import ResponseCache
from rlsim.personas.config import PersonaConfig
from rlsim.personas.engine import RatingEngine
from rlsim.personas.grounding import WorkUnit

log = logging.getLogger(__name__)

# Units in flight per request slot (workers x max_concurrency): the dispatch window. Twice the slots
# keeps every worker busy while results come back; the driver holds the rows of the shards of those
# units only, never the run's.
IN_FLIGHT_PER_SLOT = 2


def dispatch_window(cfg: PersonaConfig) -> int:
    """Units in flight at most: IN_FLIGHT_PER_SLOT per request slot of the pool."""
    return max(1, IN_FLIGHT_PER_SLOT * cfg.n_workers * cfg.max_concurrency)


def make_worker_class():
    import ray

    class PersonaWorker:
        def __init__(self, spec: BackendSpec, cfg: PersonaConfig, limiter_name: str | None, job: str,
                     cache_path: str | None, crash_marker: str | None = None, offline_model=None):
            from rlsim.personas.limiter_actor import RayLimiter, get_limiter

            if spec.kind == "offline":
                # The fitted model arrives once per worker (ray.put by the driver, shared memory on a node).
                self.engine = RatingEngine(spec, cfg, None, None, backend=OfflineBackend(offline_model,
                                                                                           cfg.offline.snap))
            else:
                self.limiter = RayLimiter(get_limiter(limiter_name), job)
                cache = ResponseCache(cache_path) if cache_path else None
                self.engine = RatingEngine(spec, cfg, self.limiter, cache, rng=random.Random(cfg.seed + os.getpid()))
                self.engine.client()  # import and build the HTTP client now, not inside the first paced slot
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


def worker_slots(units: list[WorkUnit], n_workers: int, by_user: bool) -> list[int]:
    """Worker of each unit: round robin, or (a backend with memory) one worker per user, users dealt in turn."""
    d = SlotDealer(n_workers, by_user)
    return [d.slot(u) for u in units]


def run_ray(todo, writer, spec, cfg, cache_path, job, bar, crash_marker, offline_model, ledger) -> dict:
    import ray

    from rlsim.personas.limiter import limiter_name
    from rlsim.personas.limiter_actor import cluster_limiter

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
