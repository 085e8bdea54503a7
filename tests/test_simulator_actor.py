"""The shared simulator actor batches requests from many callers into one simulator call."""

from __future__ import annotations

import asyncio
import pickle
import tempfile

import numpy as np
import pytest

from rlsim.data.schema import RatingScale
from rlsim.errors import ConfigError
from rlsim.simulators.actor import BatchingSimulator, LocalSimulator, SimulatorClient, start_simulator_actor
from rlsim.simulators.base import Session, Simulator
from tests.ray_local import barrier as make_barrier

SCALE = RatingScale(1.0, 5.0, 1.0)


class Toy(Simulator):
    """Rating = 1 + (user + item + session length) % 5, as a point mass; counts its calls."""

    name, method, conditions_on_session = "toy", "test", True

    def __init__(self):
        self.scale, self.calls = SCALE, 0

    def distribution(self, users, items, sessions=None):
        self.calls += 1
        extra = np.zeros(len(users), int) if sessions is None else np.array([len(s) for s in sessions])
        r = (np.asarray(users) + np.asarray(items) + extra) % 5
        p = np.zeros((len(users), 5))
        p[np.arange(len(users)), r] = 1.0
        return p


def test_concurrent_requests_become_one_call():
    body = BatchingSimulator(Toy(), max_wait_s=0.01)

    async def main():
        reqs = [body.distribution(np.array([u, u]), np.array([1, 2]), [Session(), Session((9,), (3.0,))])
                for u in range(8)]
        return await asyncio.gather(*reqs)

    out = asyncio.run(main())
    assert body.sim.calls == 1 and body.stats()["requests_per_batch"] == 8
    for u, p in enumerate(out):  # each caller gets its own rows back, in order
        assert p.shape == (2, 5)
        assert p[0].argmax() == (u + 1) % 5 and p[1].argmax() == (u + 2 + 1) % 5


def test_score_memoises_pairs_without_a_session():
    body = BatchingSimulator(Toy(), max_wait_s=0.0)
    a = asyncio.run(body.score(np.array([1, 2]), np.array([3, 4])))
    b = asyncio.run(body.score(np.array([2, 1]), np.array([4, 3])))
    assert body.sim.calls == 1 and np.allclose(a, b[::-1])


def test_errors_reach_every_caller():
    class Broken(Toy):
        def distribution(self, *a, **k):
            raise RuntimeError("boom")

    body = BatchingSimulator(Broken(), max_wait_s=0.01)

    async def main():
        return await asyncio.gather(*[body.distribution(np.array([1]), np.array([1])) for _ in range(3)],
                                    return_exceptions=True)

    assert all(isinstance(e, RuntimeError) for e in asyncio.run(main()))


def test_actor_serves_many_clients(tmp_path):
    import ray

    from rlsim.commands.ray_session import ray_session

    with ray_session(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     _temp_dir=tempfile.mkdtemp(prefix="rlsa", dir="/tmp")):
        handle = start_simulator_actor("test-sim", Toy, max_wait_s=1.0)
        client = pickle.loads(pickle.dumps(SimulatorClient("test-sim")))

        barrier = make_barrier(ray, 6)  # releases every runner at once, however late each one started

        @ray.remote(num_cpus=0)
        def runner(u, barrier):
            ray.get(barrier.wait.remote())
            return SimulatorClient("test-sim").distribution(np.array([u]), np.array([0]), [Session()])

        got = ray.get([runner.remote(u, barrier) for u in range(6)])
        assert [int(p[0].argmax()) for p in got] == [u % 5 for u in range(6)]
        stats = client.stats()
        # Six callers released together within one 1 s gathering window: fewer calls than callers.
        assert stats["requests"] == 6 and stats["batches"] < 6
        assert client.scale == SCALE
        with pytest.raises(ConfigError):
            SimulatorClient("nobody").handle
        ray.kill(handle)


class Flaky(Toy):
    """Fails (NaN rows) on its first call, as a persona behind a transient outage; answers after."""

    def distribution(self, users, items, sessions=None):
        p = super().distribution(users, items, sessions)
        if self.calls == 1:
            p[:] = np.nan
        return p


def test_a_failed_answer_is_asked_again_not_memoised():
    body = BatchingSimulator(Flaky(), max_wait_s=0.0)
    first = asyncio.run(body.score(np.array([1, 2]), np.array([3, 4])))
    assert np.isnan(first).all()
    second = asyncio.run(body.score(np.array([1, 2]), np.array([3, 4])))
    assert body.sim.calls == 2 and np.allclose(second, [1 + (1 + 3) % 5, 1 + (2 + 4) % 5])
    asyncio.run(body.score(np.array([1, 2]), np.array([3, 4])))
    assert body.sim.calls == 2  # answered pairs stay memoised


def test_a_transient_llm_failure_is_asked_again(tmp_path):
    """The LLM persona behind the batching body: a 500 on the first request (no retries left), an
    answer to the second request for the same pair (no cache entry, no memo of the failure)."""
    from rlsim.personas.cache import ResponseCache
    from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating
    from tests.test_llm_simulator import make_sim, pcfg

    with FakeOpenAI(FaultConfig(p_500=1.0)) as srv:
        sim = make_sim(srv, cache=ResponseCache(tmp_path / "c.sqlite"), persona=pcfg(max_retries=0),
                       method="logprobs")
        body = BatchingSimulator(sim, max_wait_s=0.0)

        async def twice():
            try:
                a = await body.score(np.array([1]), np.array([10]))
                srv.set_faults(p_500=0.0)
                return a, await body.score(np.array([1]), np.array([10]))
            finally:
                await sim.engine.aclose()

        a, b = asyncio.run(twice())
    assert np.isnan(a).all() and abs(b[0] - expected_rating(1, 10)) < 1.0
    st = sim.stats()
    assert st["failed_by_reason"] == {"http_500": 1} and st["answered"] == 1 and st["requested"] == 2


def test_local_simulator_answers_and_counts_as_the_actor_does():
    """What the env holds when only the driver samples: the simulator's own answers, the actor's counts,
    and one object however often RLlib deep-copies its env_config."""
    import copy

    local = LocalSimulator(Toy())
    users, items, sessions = np.array([1, 2, 3]), np.array([0, 1, 2]), [Session(), Session((9,), (3.0,)), Session()]
    p, why = local.distribution_with_reasons(users, items, sessions)
    np.testing.assert_array_equal(p, Toy().distribution(users, items, sessions))
    assert why == ["", "", ""] and local.scale == SCALE and local.conditions_on_session
    np.testing.assert_allclose(local.score(users, items), Toy().score(users, items))
    st = local.stats()
    assert (st["requests"], st["batches"], st["pairs"]) == (2, 2, 6) and set(st) == set(BatchingSimulator(Toy()).stats())
    cfg = copy.deepcopy({"source": local})
    assert cfg["source"] is local
