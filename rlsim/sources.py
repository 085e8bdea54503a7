"""Where rewards come from: anything with ``scale`` and ``score(user_ids, item_ids) -> ratings``.

In-process sources wrap a fitted baseline or the reward model; ``RewardSourceActor`` holds any
source in a named Ray actor that memoises pairs, and ``RemoteRewardSource`` is the client env
runners use to find it by name. The persona pool exposes an actor with the same ``score``
method, so the env never needs to know which kind it talks to.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from rlsim.errors import ConfigError, RlsimError


@runtime_checkable
class RewardSource(Protocol):
    scale: Any  # rlsim.data.schema.RatingScale (or None when unknown)

    def score(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Float ratings on the dataset scale; NaN for a pair the source could not rate."""
        ...


class BaselineRewardSource:
    """A fitted rlsim.baselines predictor (bias, mf, ...) as a reward source."""

    def __init__(self, baseline, scale=None):
        self.baseline = baseline
        self.scale = scale if scale is not None else getattr(baseline, "scale", None)
        self.name = getattr(baseline, "name", type(baseline).__name__)

    @classmethod
    def fit(cls, name: str, train, scale, seed: int = 0) -> "BaselineRewardSource":
        from rlsim.baselines import BiasBaseline, MatrixFactorization, UserMean

        makers = {"bias": BiasBaseline, "mf": lambda: MatrixFactorization(seed=seed), "user_mean": UserMean}
        if name not in makers:
            raise ConfigError(f"unknown baseline reward source '{name}' (known: {', '.join(makers)})")
        return cls(makers[name]().fit(train, scale), scale)

    def score(self, user_ids, item_ids) -> np.ndarray:
        return np.asarray(self.baseline.predict(np.asarray(user_ids), np.asarray(item_ids)), dtype=np.float64)


class ModelRewardSource:
    """The transformer reward model (rlsim.reward.predict.RewardPredictor) as a reward source."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.scale = getattr(predictor, "scale", None)
        self.name = "model"

    @classmethod
    def load(cls, checkpoint_dir: str, device: str = "cpu") -> "ModelRewardSource":
        try:
            from rlsim.reward.predict import RewardPredictor
        except ImportError as exc:
            raise ConfigError(f"the reward model is not available in this install: {exc}") from None
        return cls(RewardPredictor.load(checkpoint_dir, device=device))

    def score(self, user_ids, item_ids) -> np.ndarray:
        return np.asarray(self.predictor.predict(np.asarray(user_ids), np.asarray(item_ids)), dtype=np.float64)


class TableRewardSource:
    """Fixed ratings for known (user, item) pairs, NaN elsewhere: tests and replayed scores."""

    def __init__(self, table: dict[tuple[int, int], float], scale=None):
        self.table = dict(table)
        self.scale = scale

    def score(self, user_ids, item_ids) -> np.ndarray:
        return np.array([self.table.get((int(u), int(i)), np.nan) for u, i in zip(user_ids, item_ids)], float)


class CachedScorer:
    """Memoises a source's scores by (user, item); only unseen pairs reach the source, in one batch."""

    def __init__(self, source: RewardSource, batch_size: int = 65536):
        self.source = source
        self.batch_size = batch_size
        self.cache: dict[tuple[int, int], float] = {}
        self.calls = 0
        self.requested = 0
        self.computed = 0
        self.seconds = 0.0

    def score(self, user_ids, item_ids) -> np.ndarray:
        u = np.asarray(user_ids, dtype=np.int64).ravel()
        i = np.asarray(item_ids, dtype=np.int64).ravel()
        if len(u) != len(i):
            raise ValueError(f"user_ids and item_ids differ in length ({len(u)} vs {len(i)})")
        self.calls += 1
        self.requested += len(u)
        keys = list(zip(u.tolist(), i.tolist()))
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            t0 = time.perf_counter()
            arr = np.array(todo, dtype=np.int64)
            for s in range(0, len(arr), self.batch_size):
                part = arr[s:s + self.batch_size]
                vals = np.asarray(self.source.score(part[:, 0], part[:, 1]), dtype=np.float64)
                for k, v in zip(map(tuple, part.tolist()), vals.tolist()):
                    self.cache[k] = v
            self.computed += len(todo)
            self.seconds += time.perf_counter() - t0
        return np.array([self.cache[k] for k in keys], dtype=np.float64)

    def stats(self) -> dict:
        return {"calls": self.calls, "pairs_requested": self.requested, "pairs_computed": self.computed,
                "cache_size": len(self.cache), "hit_rate": 1 - self.computed / max(self.requested, 1),
                "source_seconds": round(self.seconds, 4)}


def _actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class RewardSourceActor:
        """Holds one source (built inside the actor by source_factory), scores in batches, memoises."""

        def __init__(self, source_factory: Callable[[], RewardSource], batch_size: int = 65536):
            source = source_factory()
            self.scale = getattr(source, "scale", None)
            self.scorer = CachedScorer(source, batch_size)

        def score(self, user_ids, item_ids) -> np.ndarray:
            return self.scorer.score(user_ids, item_ids)

        def get_scale(self):
            return self.scale

        def stats(self) -> dict:
            return self.scorer.stats()

    return RewardSourceActor


_ACTOR = None


def reward_source_actor_class():
    """The Ray actor class (built lazily so importing this module does not import Ray)."""
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = _actor_class()
    return _ACTOR


def __getattr__(name):  # module attribute RewardSourceActor, resolved on first use
    if name == "RewardSourceActor":
        return reward_source_actor_class()
    raise AttributeError(name)


def get_or_create_reward_actor(name: str, source_factory: Callable[[], RewardSource], namespace: str | None = None,
                               detached: bool = False, num_cpus: float = 0, batch_size: int = 65536):
    """The named reward actor, created from source_factory if it does not exist yet (Ray must be up).

    Keep the returned handle alive: a non-detached actor ends when its creator's handles go.
    """
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        pass
    opts: dict[str, Any] = {"name": name, "get_if_exists": True, "num_cpus": num_cpus}
    if namespace is not None:
        opts["namespace"] = namespace
    if detached:
        opts["lifetime"] = "detached"
    actor = reward_source_actor_class().options(**opts).remote(source_factory, batch_size)
    try:
        ray.get(actor.get_scale.remote())  # surface construction errors here, not in an env runner
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, RlsimError):
            raise type(cause)(str(cause)) from None
        last = [ln for ln in str(cause).strip().splitlines() if ln.strip()][-1:] or [type(cause).__name__]
        raise RlsimError(f"reward source '{name}' failed to start: {last[0].strip()}") from None
    return actor


class RemoteRewardSource:
    """Client for a named actor with a ``score(users, items)`` method (reward actor or persona pool)."""

    def __init__(self, actor_name: str, namespace: str | None = None, scale=None):
        self.actor_name = actor_name
        self.namespace = namespace
        self._scale = scale
        self._handle = None

    def __getstate__(self):  # handles are looked up again after pickling (env runners)
        d = dict(self.__dict__)
        d["_handle"] = None
        return d

    @property
    def handle(self):
        if self._handle is None:
            import ray

            try:
                self._handle = ray.get_actor(self.actor_name, namespace=self.namespace)
            except ValueError:
                raise ConfigError(f"no reward actor named '{self.actor_name}' "
                                  f"(namespace {self.namespace!r}) is running") from None
        return self._handle

    @property
    def scale(self):
        if self._scale is None:
            import ray

            try:
                self._scale = ray.get(self.handle.get_scale.remote())
            except AttributeError:  # an actor without get_scale (e.g. a persona pool)
                self._scale = None
        return self._scale

    def score(self, user_ids, item_ids) -> np.ndarray:
        import ray

        out = self.handle.score.remote(np.asarray(user_ids), np.asarray(item_ids))
        return np.asarray(ray.get(out), dtype=np.float64)

    def stats(self) -> dict:
        import ray

        return ray.get(self.handle.stats.remote())
