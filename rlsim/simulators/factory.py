"""Which simulator a policy trains against, named once and built anywhere (driver, actor, runner).

``SimulatorSpec`` is the plain, picklable description (`--reward` and its flags, or the study's
source list); :func:`simulator_factory` turns it into a zero-argument callable that builds the
simulator where it is called, so a Ray actor can build a reward model inside itself instead of
receiving a pickled one.

Kinds: ``bias`` / ``mf`` (baselines with calibrated ordinal noise), ``model`` (the reward model's
softmax; needs ``checkpoint``), ``personas`` (the offline persona, not an LLM), ``hybrid`` (the
reward model, with the persona asked where it is unsure and distilled back: rlsim.simulators.hybrid;
needs ``checkpoint``, settings in ``options``; the persona is the offline one, or a running persona
simulator actor named by ``options["persona_actor"]``), ``llm_persona`` (LLM personas through an
OpenAI-compatible endpoint, rlsim.simulators.llm: the `personas:` settings for the endpoint, limits
and budget, ``options`` for the `llm_persona:` section; the API key is an argument of the factory,
given at the CLI edge, never part of the spec), ``actor`` (a simulator already running as a named
Ray actor, e.g. started by another job).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from rlsim.errors import ConfigError

KINDS = ("bias", "mf", "model", "personas", "hybrid", "llm_persona", "actor")


@dataclass
class SimulatorSpec:
    kind: str = "mf"
    checkpoint: str | None = None  # reward model checkpoint folder (kind "model")
    actor: str | None = None  # a running simulator actor's name (kind "actor")
    namespace: str | None = None
    options: dict = field(default_factory=dict)  # kind-specific settings (hybrid: HybridConfig fields)

    def validate(self) -> "SimulatorSpec":
        if self.kind not in KINDS:
            raise ConfigError(f"unknown reward source {self.kind!r} (known: {', '.join(KINDS)})")
        if self.kind in ("model", "hybrid") and not self.checkpoint:
            raise ConfigError(f"--reward {self.kind} needs --reward-checkpoint DIR (from `rlsim reward train`)")
        if self.kind in ("model", "hybrid") and not Path(self.checkpoint).exists():
            raise ConfigError(f"reward checkpoint not found: {self.checkpoint}")
        if self.kind == "actor" and not self.actor:
            raise ConfigError("--reward actor needs --reward-actor NAME")
        return self

    def label(self) -> str:
        return {"model": "reward_model", "personas": "offline_persona"}.get(self.kind, self.kind)


def _hybrid(checkpoint: str, options: dict, persona_factory):
    from rlsim.config import from_dict
    from rlsim.simulators.hybrid import HybridConfig, HybridSimulator

    opts = dict(options)
    actor = opts.pop("persona_actor", None)
    if actor:
        from rlsim.simulators.actor import SimulatorClient

        persona = SimulatorClient(actor, opts.pop("persona_namespace", None))
    else:
        persona = persona_factory()
    return HybridSimulator(_reward_model(checkpoint), persona, from_dict(HybridConfig, opts, "hybrid"))


def _offline_persona(ds, train: pd.DataFrame, persona_cfg, text_model: str, cache_dir: str, seed: int):
    from rlsim.embeddings import item_text_vectors
    from rlsim.simulators.persona import offline_persona_simulator

    vectors = item_text_vectors(ds.items, text_model, cache_dir)
    return offline_persona_simulator(ds, train, persona_cfg, vectors, seed)


def _reward_model(checkpoint: str):
    from rlsim.simulators.reward_model import RewardModelSimulator

    return RewardModelSimulator.load(checkpoint)


def simulator_factory(spec: SimulatorSpec, ds, train: pd.DataFrame, *, seed: int = 0, persona_cfg=None,
                      text_model: str = "all-MiniLM-L6-v2", cache_dir: str = "~/.cache/rlsim",
                      api_key: str | None = None) -> Callable:
    """A picklable zero-argument callable that builds the simulator (not for kind "actor").

    ``api_key``: the LLM endpoint's key for kind "llm_persona" (from the CLI edge; never in the spec)."""
    from rlsim.simulators.point import baseline_simulator

    spec.validate()
    if spec.kind == "llm_persona":
        from rlsim.simulators.llm import llm_persona_factory

        return llm_persona_factory(ds, train, persona_cfg, api_key, spec.options, seed=seed, text_model=text_model,
                                   cache_dir=cache_dir)
    if spec.kind in ("bias", "mf"):
        return functools.partial(baseline_simulator, spec.kind, train, ds.scale, seed)
    if spec.kind == "model":
        return functools.partial(_reward_model, spec.checkpoint)
    if spec.kind in ("personas", "hybrid"):
        from rlsim.personas.config import PersonaConfig

        pcfg = persona_cfg or PersonaConfig()
        if spec.kind == "personas" and pcfg.backend != "offline":
            raise ConfigError("--reward personas trains against the offline persona; an LLM persona pool is "
                              "reached as a running simulator actor (--reward actor --reward-actor NAME)")
        # The hybrid's in-process persona is the offline one whatever the backend (an LLM pool is an actor).
        offline = functools.partial(_offline_persona, ds, train, PersonaConfig(offline=pcfg.offline), text_model,
                                    cache_dir, seed)
        if spec.kind == "personas":
            return offline
        return functools.partial(_hybrid, spec.checkpoint, dict(spec.options), offline)
    raise ConfigError(f"reward source {spec.kind!r} is a running actor; it has no in-process factory")


def local_simulator(spec: SimulatorSpec, ds, train: pd.DataFrame, **kw):
    """The simulator in this process; for kind "actor", a client of the running actor (Ray must be up)."""
    if spec.validate().kind == "actor":
        from rlsim.simulators.actor import SimulatorClient

        return SimulatorClient(spec.actor, spec.namespace, scale=ds.scale)
    return simulator_factory(spec, ds, train, **kw)()
