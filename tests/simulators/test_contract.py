"""Every registered simulated user keeps the contract of rlsim.simulators.base, in this process and
hosted in a simulator actor alike. A simulator added to the registry without a setup here fails."""

from __future__ import annotations

import numpy as np
import pytest

from rlsim.config import DataConfig
from rlsim.errors import ConfigError, RlsimError
from rlsim.personas.config import PersonaConfig
from rlsim.simulators import registry
from rlsim.simulators.base import EMPTY, NoChoiceModel, Session, expectation
from rlsim.simulators.factory import SimulatorSpec, local_simulator, simulator_factory
from tests.fake_openai import FakeOpenAI
from tests.ray_local import private_ray


@pytest.fixture(scope="module")
def split(data_root, cache_root):
    from rlsim.data import load_split

    return load_split(DataConfig(dataset="ml-100k", split="u1", data_dir=str(data_root), cache_dir=str(cache_root),
                                 download=False))


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI() as srv:
        yield srv


def _llm_cfg(srv) -> PersonaConfig:
    return PersonaConfig(backend="openai", model="fake-model", base_url=srv.base_url, rpm=60000, tpm=1e9,
                         timeout_s=10.0, max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05, batch_size=10,
                         cache=False)


# name -> (spec, factory keywords) for the registry's in-process simulators; "actor" is checked by
# hosting each of them in a simulator actor (test_actor_hosted_simulators_keep_the_contract).
def _setup(name, ckpt, srv, cache_root):
    kw = {"seed": 0, "cache_dir": str(cache_root)}
    if name == "llm_persona":
        return SimulatorSpec(name, options={"method": "logprobs"}), {**kw, "persona_cfg": _llm_cfg(srv),
                                                                      "api_key": "sk-contract-test"}
    if name == "hybrid":  # never distils while judged: the same pairs get the same answer
        return SimulatorSpec(name, str(ckpt), options={"distill_every": 0}), kw
    return SimulatorSpec(name, str(ckpt) if "checkpoint" in registry.entry(name).needs else None), kw


LOCAL = [n for n in registry.names() if registry.entry(n).build is not None]


# Sources that choose what to watch here (the others only rate, and say so). The reward model chooses
# only when trained with a choice head; the contract's tiny checkpoint has none.
CHOOSING = set(registry.choosing()) - {"reward_model"}


def test_every_registered_simulator_is_covered_here():
    assert set(registry.names()) == set(LOCAL) | {"actor"}, "a new simulator needs a setup in this test"
    # one name: aliases resolve to it, outputs say it
    assert registry.canonical("model") == "reward_model" and registry.canonical("personas") == "offline_persona"
    assert {"bias", "mf", "offline_persona", "llm_persona"} <= CHOOSING and "reward_model" in registry.choosing()
    assert SimulatorSpec("model", "x").kind == "reward_model"
    with pytest.raises(ConfigError, match="unknown simulated user 'nope'"):
        SimulatorSpec("nope").validate()


def _pairs(split, n=24):
    test = split.test.head(n)
    return test.user_id.to_numpy(), test.item_id.to_numpy()


def check_contract(sim, scale, users, items, name):
    n = len(users)
    p = sim.distribution(users, items)
    assert p.shape == (n, scale.n_classes)
    assert np.isfinite(p).all() and (p >= 0).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(sim.score(users, items), expectation(p, scale), atol=1e-6)
    a = sim.sample(users, items, rng=np.random.default_rng(3))
    b = sim.sample(users, items, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)  # seeded
    assert np.isin(a, scale.values).all()
    with pytest.raises(ValueError):
        sim.sample(users, items)  # no unseeded draws
    # An empty session is the same question as no session.
    np.testing.assert_allclose(sim.distribution(users, items, [EMPTY] * n), p, atol=1e-6)
    sessions = [Session((int(items[(k + 1) % n]),), (1.0,)) for k in range(n)]
    d = sim.describe()
    assert d["name"] == name and d["method"] and isinstance(d["conditions_on_session"], bool)
    if not d["conditions_on_session"]:  # says it ignores the session: it must
        np.testing.assert_allclose(sim.distribution(users, items, sessions), p, atol=1e-6)
    # Choice: a probability per pair where the simulator has a choice model, one clear error where not.
    if sim.has_choice:
        c = sim.choice(users, items)
        assert c.shape == (n,) and np.isfinite(c).all() and ((c >= 0) & (c <= 1)).all()
        o = sim.outcome(users, items)
        assert o.shape == (n, 1 + scale.n_classes)
        np.testing.assert_allclose(o.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(o[:, 0], 1 - c, atol=1e-9)
        shown = [Session((int(i),), (4.0,)) for i in items]  # already shown in this session
        assert (sim.choice(users, items, shown) == 0).all()
        # The hybrid picks by its reward model's head, else its persona's choice (neighbours here).
        assert d["choice"] == ("neighbours" if name == "hybrid" else registry.entry(name).choice)
    else:
        with pytest.raises(NoChoiceModel, match="has no choice model"):
            sim.choice(users, items)
    return p


@pytest.mark.parametrize("name", LOCAL)
def test_local_simulators_keep_the_contract(name, split, tiny_reward_checkpoint, server, cache_root):
    ds, sp = split
    spec, kw = _setup(name, tiny_reward_checkpoint, server, cache_root)
    sim = local_simulator(spec, ds, sp.train, **kw)
    try:
        users, items = _pairs(sp)
        check_contract(sim, ds.scale, users, items, name)
        assert sim.has_choice == (name in CHOOSING)
        with pytest.raises((ValueError, RlsimError), match="sessions for"):
            sim.distribution(users, items, [EMPTY] * (len(users) - 1))  # one session per pair
    finally:
        close = getattr(sim, "close", None)
        if close is not None:
            close()


def test_actor_hosted_simulators_keep_the_contract(split, tiny_reward_checkpoint, server, cache_root):
    """Each simulator hosted in a simulator actor answers as it does in this process (same pairs,
    same distribution), and the client keeps the contract too."""
    from rlsim.simulators.actor import SimulatorClient, start_simulator_actor, stop_simulator_actor

    ds, sp = split
    users, items = _pairs(sp, 16)
    with private_ray("rlct"):
        for name in LOCAL:
            spec, kw = _setup(name, tiny_reward_checkpoint, server, cache_root)
            local = simulator_factory(spec, ds, sp.train, **kw)()
            want = local.distribution(users, items)
            handle = start_simulator_actor(f"contract-{name}", simulator_factory(spec, ds, sp.train, **kw))
            try:
                client = SimulatorClient(f"contract-{name}", scale=ds.scale)
                got = check_contract(client, ds.scale, users, items, name)
                assert client.has_choice == (name in CHOOSING)
                if client.has_choice:
                    np.testing.assert_allclose(client.choice(users, items), local.choice(users, items), atol=1e-9)
                np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
                via_spec = local_simulator(SimulatorSpec("actor", actor=f"contract-{name}"), ds, sp.train)
                np.testing.assert_allclose(via_spec.distribution(users, items), want, atol=1e-5)
            finally:
                stop_simulator_actor(handle)
