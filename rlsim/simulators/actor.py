"""One simulator shared by every env runner: a named async Ray actor that batches across callers.

Each env runner sends one request per step (all its envs' picks). The actor holds requests that
arrive within ``max_wait_s`` of each other and answers them with ONE simulator call, so a reward
model's forward pass (or a persona pool's round of LLM requests) serves many runners at once.
A simulator with an async ``adistribution`` (the LLM persona pool) is awaited directly, so slow
requests overlap: a batch that gathers while earlier ones are still being answered is answered at
once, beside them. A synchronous one runs in a thread, one batch at a time (it may keep state, as
the hybrid does); what arrives meanwhile is answered together when it is done.

``SimulatorClient`` is what env runners hold: picklable, it finds the actor by name.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import numpy as np

from rlsim.errors import ConfigError, RlsimError
from rlsim.simulators.base import Simulator, expectation, unanswered_reasons


def simulator_stats(holder) -> dict:
    """The request counts of a simulator holder (BatchingSimulator or LocalSimulator) and its simulator's description."""
    return {"requests": holder.requests, "batches": holder.batches, "pairs": holder.pairs,
            "requests_per_batch": holder.requests / max(holder.batches, 1), "busy_s": round(holder.busy_s, 3),
            "simulator": holder.sim.describe() if hasattr(holder.sim, "describe") else {}}


class BatchingSimulator:
    """The actor's body, usable without Ray (tests): gathers concurrent requests into one call."""

    def __init__(self, sim, max_wait_s: float = 0.002, max_batch: int = 8192):
        self.sim = sim
        self.scale = sim.scale
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self._pending: list[tuple[Any, Any, Any, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None  # the gathering window now open (None: none is)
        self._tasks: set[asyncio.Task] = set()  # flushes under way (strong references)
        self._lock: asyncio.Lock | None = None  # one synchronous call at a time
        self._lock_loop = None
        self.requests = 0
        self.batches = 0
        self.pairs = 0
        self.busy_s = 0.0
        self._memo: dict[tuple[int, int], float] = {}

    async def distribution(self, users, items, sessions=None) -> np.ndarray:
        return (await self.distribution_with_reasons(users, items, sessions))[0]

    async def distribution_with_reasons(self, users, items, sessions=None) -> tuple[np.ndarray, list[str]]:
        """Distributions and each row's failure reason ("" when answered), from the batched call."""
        fut = asyncio.get_running_loop().create_future()
        n = len(users)
        sessions = list(sessions) if sessions is not None else [None] * n
        self._pending.append((np.asarray(users), np.asarray(items), sessions, fut))
        self.requests += 1
        if sum(len(p[0]) for p in self._pending) >= self.max_batch:
            await self._flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_later())
            self._tasks.add(self._flusher)
            self._flusher.add_done_callback(self._tasks.discard)
        return await fut

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.max_wait_s)
        # The window is closed: a request from now on opens the next one, even while this batch is
        # being answered (it used to wait for yet another request, forever when none came).
        self._flusher = None
        await self._flush()

    def _sync_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def _flush(self) -> None:
        if hasattr(self.sim, "adistribution"):
            batch, self._pending = self._pending, []
            await self._answer(batch)
            return
        async with self._sync_lock():
            batch, self._pending = self._pending, []  # everything that arrived while the last call ran
            await self._answer(batch)

    async def _answer(self, batch: list) -> None:
        if not batch:
            return
        users = np.concatenate([b[0] for b in batch])
        items = np.concatenate([b[1] for b in batch])
        sessions = [s for b in batch for s in b[2]]
        if all(s is None for s in sessions):
            sessions = None
        else:
            from rlsim.simulators.base import EMPTY

            sessions = [EMPTY if s is None else s for s in sessions]
        t0 = time.perf_counter()
        try:
            if hasattr(self.sim, "adistribution_with_reasons"):
                p, why = await self.sim.adistribution_with_reasons(users, items, sessions)
            elif hasattr(self.sim, "adistribution"):
                p = await self.sim.adistribution(users, items, sessions)
                why = unanswered_reasons(p)
            elif hasattr(self.sim, "distribution_with_reasons"):
                p, why = await asyncio.to_thread(self.sim.distribution_with_reasons, users, items, sessions)
            else:
                p = await asyncio.to_thread(self.sim.distribution, users, items, sessions)
                why = unanswered_reasons(p)
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error, none hangs
            for b in batch:
                if not b[3].done():
                    b[3].set_exception(exc)
            return
        finally:
            self.busy_s += time.perf_counter() - t0
        self.batches += 1
        self.pairs += len(users)
        pos = 0
        for b in batch:
            k = len(b[0])
            if not b[3].done():
                b[3].set_result((np.asarray(p[pos:pos + k]), list(why[pos:pos + k])))
            pos += k

    async def choice_with_reasons(self, users, items, sessions=None) -> tuple[np.ndarray, list[str]]:
        """P(pick) per pair and why it failed ("" when answered). Not gathered into batches: a choice
        model is a numpy lookup, and an LLM persona's page choice is awaited (its requests overlap)."""
        if hasattr(self.sim, "achoice_with_reasons"):
            p, why = await self.sim.achoice_with_reasons(users, items, sessions)
        else:
            p, why = self.sim.choice_with_reasons(users, items, sessions)
        return np.asarray(p, float), list(why)

    async def score(self, users, items, sessions=None) -> np.ndarray:
        """Expectations; without a session they are memoised by (user, item) (the static table path).
        A failed pair (NaN) is not memoised: a later request asks the simulator again, whose own retry
        policy and budget decide (a transient failure must not last the whole run)."""
        users, items = np.asarray(users), np.asarray(items)
        if sessions is not None:
            return expectation(await self.distribution(users, items, sessions), self.scale)
        keys = list(zip(users.tolist(), items.tolist()))
        out = np.array([self._memo.get(k, np.nan) for k in keys], np.float64)
        todo = [j for j, k in enumerate(keys) if k not in self._memo]
        if todo:
            p = await self.distribution(users[todo], items[todo])
            for j, v in zip(todo, expectation(p, self.scale)):
                out[j] = float(v)
                if np.isfinite(v):
                    self._memo[keys[j]] = float(v)
        return out

    def stats(self) -> dict:
        return simulator_stats(self)


class LocalSimulator:
    """A simulator in this process with the actor's bookkeeping (requests, batches, pairs, busy_s): what
    the env holds when the driver is the only one sampling, so no step pays an actor round trip.

    RLlib deep-copies env_config; every copy is this one object (the counts stay in one place)."""

    def __init__(self, sim):
        self.sim = sim
        self.requests = self.batches = self.pairs = 0
        self.busy_s = 0.0

    def __deepcopy__(self, memo):
        return self

    def __getattr__(self, name):  # scale, name, has_choice, conditions_on_session, describe, ...
        if name == "sim":
            raise AttributeError(name)
        return getattr(self.sim, name)

    def distribution_with_reasons(self, users, items, sessions=None) -> tuple[np.ndarray, list[str]]:
        t0 = time.perf_counter()
        try:
            if hasattr(self.sim, "distribution_with_reasons"):
                p, why = self.sim.distribution_with_reasons(users, items, sessions)
            else:
                p = self.sim.distribution(users, items, sessions)
                why = unanswered_reasons(p)
        finally:
            self.busy_s += time.perf_counter() - t0
        self.requests += 1
        self.batches += 1
        self.pairs += len(users)
        return np.asarray(p), list(why)

    def distribution(self, users, items, sessions=None) -> np.ndarray:
        return self.distribution_with_reasons(users, items, sessions)[0]

    def score(self, users, items, sessions=None) -> np.ndarray:
        return expectation(self.distribution(users, items, sessions), self.sim.scale)

    def stats(self) -> dict:
        return simulator_stats(self)


def _actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class SimulatorActor:
        def __init__(self, factory: Callable[[], Any], max_wait_s: float = 0.002):
            self.body = BatchingSimulator(factory(), max_wait_s)

        async def distribution(self, users, items, sessions=None):
            return await self.body.distribution(users, items, sessions)

        async def distribution_with_reasons(self, users, items, sessions=None):
            return await self.body.distribution_with_reasons(users, items, sessions)

        async def score(self, users, items, sessions=None):
            return await self.body.score(users, items, sessions)

        async def choice(self, users, items, sessions=None):
            return (await self.body.choice_with_reasons(users, items, sessions))[0]

        async def choice_with_reasons(self, users, items, sessions=None):
            return await self.body.choice_with_reasons(users, items, sessions)

        async def get_scale(self):
            return self.body.scale

        async def stats(self):
            return self.body.stats()

        async def close(self):
            """Let the simulator release what it holds (HTTP clients, its limiter registration)."""
            if hasattr(self.body.sim, "aclose"):
                await self.body.sim.aclose()
            return self.body.stats()

    return SimulatorActor


_ACTOR = None


def start_simulator_actor(name: str, factory: Callable[[], Any], namespace: str | None = None,
                          max_wait_s: float = 0.002):
    """Create the named simulator actor (Ray must be up) and wait until its simulator is built.

    Keep the returned handle alive: a non-detached actor ends with its creator's last handle."""
    import ray

    global _ACTOR
    if _ACTOR is None:
        _ACTOR = _actor_class()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: losing a worker node then costs only the env runners it held (RLlib
    # restarts them), never the simulator every runner talks to. Hard affinity: with soft=True
    # Ray 2.60 placed it on another node even with room here (the driver's node is alive by
    # definition, and the actor needs no CPU).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    opts: dict[str, Any] = {"name": name, "get_if_exists": True, "max_concurrency": 1000, "scheduling_strategy": here}
    if namespace is not None:
        opts["namespace"] = namespace
    actor = _ACTOR.options(**opts).remote(factory, max_wait_s)
    try:
        ray.get(actor.get_scale.remote())  # construction errors surface here, not in an env runner
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, RlsimError):
            raise type(cause)(str(cause)) from None
        last = [ln for ln in str(cause).strip().splitlines() if ln.strip()][-1:] or [type(cause).__name__]
        raise RlsimError(f"simulator '{name}' failed to start: {last[0].strip()}") from None
    return actor


def stop_simulator_actor(actor, timeout_s: float = 60.0) -> dict | None:
    """Close the actor's simulator (best effort) and kill the actor; returns its last stats."""
    import ray

    stats = None
    try:
        stats = ray.get(actor.close.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - an actor that is already gone is stopped
        pass
    ray.kill(actor)
    return stats


class SimulatorClient(Simulator):
    """A simulator living in a named actor: the contract's distribution/score/sample, like a local one."""

    def __init__(self, actor_name: str, namespace: str | None = None, scale=None):
        self.actor_name, self.namespace = actor_name, namespace
        self._scale, self._handle = scale, None

    def __getstate__(self):  # handles are looked up again after pickling (env runners)
        return {**self.__dict__, "_handle": None}

    @property
    def handle(self):
        if self._handle is None:
            import ray

            try:
                self._handle = ray.get_actor(self.actor_name, namespace=self.namespace)
            except ValueError:
                raise ConfigError(f"no simulator actor named '{self.actor_name}' "
                                  f"(namespace {self.namespace!r}) is running") from None
        return self._handle

    @property
    def scale(self):
        if self._scale is None:
            import ray

            self._scale = ray.get(self.handle.get_scale.remote())
        return self._scale

    def distribution(self, users, items, sessions=None) -> np.ndarray:
        import ray

        return np.asarray(ray.get(self.handle.distribution.remote(np.asarray(users), np.asarray(items), sessions)))

    def distribution_with_reasons(self, users, items, sessions=None) -> tuple[np.ndarray, list[str]]:
        import ray

        p, why = ray.get(self.handle.distribution_with_reasons.remote(np.asarray(users), np.asarray(items), sessions))
        return np.asarray(p), list(why)

    def score(self, users, items, sessions=None) -> np.ndarray:
        import ray

        return np.asarray(ray.get(self.handle.score.remote(np.asarray(users), np.asarray(items), sessions)), float)

    def choice(self, users, items, sessions=None) -> np.ndarray:
        import ray

        if not self.has_choice:  # one line, as a local simulator that only rates says it
            return super().choice(users, items, sessions)
        return np.asarray(ray.get(self.handle.choice.remote(np.asarray(users), np.asarray(items), sessions)), float)

    def choice_with_reasons(self, users, items, sessions=None) -> tuple[np.ndarray, list[str]]:
        import ray

        if not self.has_choice:
            return super().choice_with_reasons(users, items, sessions)
        p, why = ray.get(self.handle.choice_with_reasons.remote(np.asarray(users), np.asarray(items), sessions))
        return np.asarray(p, float), list(why)

    @property
    def has_choice(self) -> bool:
        return self.describe().get("choice") is not None

    def stats(self) -> dict:
        import ray

        return ray.get(self.handle.stats.remote())

    def describe(self) -> dict:
        """The actor's simulator's own description (its method, counts, ...), as fidelity reports it."""
        return self.stats().get("simulator", {})

    @property
    def conditions_on_session(self) -> bool:
        return bool(self.describe().get("conditions_on_session", False))

    @property
    def method(self) -> str:
        return str(self.describe().get("method", ""))
