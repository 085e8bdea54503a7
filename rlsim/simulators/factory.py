"""Which simulator a policy trains against, described once and built anywhere (driver, actor, runner).

``SimulatorSpec`` is the plain, picklable description (`--reward` and its flags, or a study source):
``kind`` is the simulator's one name in :mod:`rlsim.simulators.registry` (``bias``, ``mf``,
``reward_model``, ``offline_persona``, ``hybrid``, ``llm_persona``, ``actor``), old names are
accepted and stored as the one name. :func:`simulator_factory` turns a spec into a zero-argument
callable that builds the simulator where it is called; :func:`local_simulator` builds it here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from rlsim.errors import ConfigError
from rlsim.simulators import registry

KINDS = registry.names()


@dataclass
class SimulatorSpec:
    kind: str = "mf"
    checkpoint: str | None = None  # reward model checkpoint folder (reward_model, hybrid)
    actor: str | None = None  # a running simulator actor's name (actor)
    namespace: str | None = None
    options: dict = field(default_factory=dict)  # simulator-specific settings (hybrid: HybridConfig fields)

    def __post_init__(self):
        try:
            self.kind = registry.canonical(self.kind)
        except ConfigError:
            pass  # validate() says so in one line, where the caller can report it

    def validate(self) -> "SimulatorSpec":
        self.kind = registry.canonical(self.kind)
        needs = registry.entry(self.kind).needs
        if "checkpoint" in needs and not self.checkpoint:
            raise ConfigError(f"--reward {self.kind} needs --reward-checkpoint DIR (from `rlsim reward train`)")
        if "checkpoint" in needs and not Path(self.checkpoint).exists():
            raise ConfigError(f"reward checkpoint not found: {self.checkpoint}")
        if "actor" in needs and not self.actor:
            raise ConfigError("--reward actor needs --reward-actor NAME")
        return self

    def label(self) -> str:
        return self.kind


def simulator_factory(spec: SimulatorSpec, ds, train: pd.DataFrame, *, seed: int = 0, persona_cfg=None,
                      text_model: str = "all-MiniLM-L6-v2", cache_dir: str = "~/.cache/rlsim",
                      api_key: str | None = None) -> Callable:
    """A picklable zero-argument callable that builds the simulator (not for a running actor).

    ``api_key``: the LLM endpoint's key for llm_persona (from the CLI edge; never in the spec)."""
    e = registry.entry(spec.validate().kind)
    if e.build is None:
        raise ConfigError(f"simulated user {spec.kind!r} is a running actor; it has no in-process factory")
    ctx = registry.BuildContext(ds, train, seed=seed, persona_cfg=persona_cfg, text_model=text_model,
                                cache_dir=cache_dir, api_key=api_key)
    return e.build(spec, ctx)


def local_simulator(spec: SimulatorSpec, ds, train: pd.DataFrame, **kw):
    """The simulator in this process; for a running actor, a client of it (Ray must be up)."""
    if spec.validate().kind == "actor":
        from rlsim.simulators.actor import SimulatorClient

        return SimulatorClient(spec.actor, spec.namespace, scale=ds.scale)
    return simulator_factory(spec, ds, train, **kw)()
