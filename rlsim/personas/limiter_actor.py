"""The cluster's limiter: ONE detached named Ray actor per endpoint and model (``limiter_name``) in the
``rlsim`` namespace, running ``limiter.RateLimiter`` with its state in Ray's GCS key-value store
(``KVStore``: a restarted actor picks up where it was), and ``RayLimiter``, the async facade a job's
engines call (same interface as ``limiter.LocalLimiter``)."""

from __future__ import annotations

import json
import time

from rlsim.personas.limiter import LIMITER_NAMESPACE, LOCAL_JOB, RateLimiter


class KVStore:
    """The limiter's state in Ray's GCS key-value store (survives the actor, not the cluster)."""

    def __init__(self, key: str):
        self.key = f"rlsim:limiter:{key}"

    def load(self) -> dict | None:
        from ray.experimental import internal_kv

        v = internal_kv._internal_kv_get(self.key, namespace=LIMITER_NAMESPACE)
        return json.loads(v) if v else None

    def save(self, state: dict) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.key, json.dumps(state), overwrite=True, namespace=LIMITER_NAMESPACE)


class RayLimiter:
    """Async facade over the named limiter actor, bound to one job."""

    def __init__(self, handle, job: str = LOCAL_JOB):
        self.handle = handle
        self.job = job

    async def reserve(self, tokens: int, est_usd: float = 0.0) -> float:
        return await self.handle.reserve.remote(tokens, est_usd, self.job)

    async def try_reserve(self, tokens: int, est_usd: float = 0.0) -> tuple[str, float]:
        return tuple(await self.handle.try_reserve.remote(tokens, est_usd, self.job))

    async def settle(self, reserved_usd: float, actual_usd: float, reserved_tokens: int = 0,
                     actual_tokens: int | None = None) -> None:
        await self.handle.settle.remote(reserved_usd, actual_usd, reserved_tokens, actual_tokens, self.job)

    async def pause(self, seconds: float) -> None:
        await self.handle.pause.remote(seconds)

    async def stats(self) -> dict:
        return await self.handle.job_stats.remote(self.job)


_ACTOR_CLS = None


def _actor_class():
    global _ACTOR_CLS
    if _ACTOR_CLS is None:
        import ray

        class LimiterActor(RateLimiter):
            def __init__(self, name: str):
                # Wall clock: the saved state must mean the same after a restart in a new process.
                super().__init__(None, None, clock=time.time, store=KVStore(name))

            def ping(self) -> bool:
                return True

        _ACTOR_CLS = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(LimiterActor)
    return _ACTOR_CLS


def cluster_limiter(name: str):
    """The detached limiter actor of this cluster for ``name`` (created by the first caller)."""
    return _actor_class().options(name=name, namespace=LIMITER_NAMESPACE, get_if_exists=True,
                                  lifetime="detached").remote(name)


def get_limiter(name: str):
    import ray

    return ray.get_actor(name, namespace=LIMITER_NAMESPACE)
