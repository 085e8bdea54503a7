"""Every simulated user rlsim knows, under ONE name used everywhere: flags (`--reward NAME`), configs
(`study.sources`), the study and the report, train_metrics.json and the bench JSON keys.

An entry says what the simulator needs and how to build it; adding a simulated user is one class
(a :class:`rlsim.simulators.base.Simulator`) and one ``register(...)`` line here, as in Surprise.
``build(spec, ctx)`` returns a picklable zero-argument factory, so a Ray actor builds the simulator
inside itself instead of receiving a pickled one. Old names (``model``, ``personas``) are accepted
on input only (run folders written before the rename still load); every output says the one name.

Needs: ``checkpoint`` (a reward model from `rlsim reward train`), ``persona_config`` (the
`personas:` section), ``endpoint`` (an OpenAI-compatible endpoint; its key comes from the CLI edge,
never the spec), ``actor`` (a simulator already running as a named Ray actor).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from rlsim.errors import ConfigError


@dataclass(frozen=True)
class BuildContext:
    """What every builder may use: the dataset, its training ratings and the edge's settings."""

    ds: object
    train: pd.DataFrame
    seed: int = 0
    persona_cfg: object | None = None
    text_model: str = "all-MiniLM-L6-v2"
    cache_dir: str = "~/.cache/rlsim"
    api_key: str | None = field(default=None, repr=False)  # never printed


@dataclass(frozen=True)
class Entry:
    name: str
    about: str
    build: Callable | None  # (spec, ctx) -> zero-argument factory; None: reached through a running actor
    needs: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    choice: str | None = None  # its choice model (rlsim.simulators.choice); None: it only rates
    # Synchronous and local (numpy/torch, no endpoint): when only the driver samples, the policy stage
    # builds it there instead of in an actor (a round trip per step cost ~40% of a sampled MF iteration).
    in_driver: bool = False


REGISTRY: dict[str, Entry] = {}
_ALIASES: dict[str, str] = {}


def register(entry: Entry) -> Entry:
    if entry.name in REGISTRY or entry.name in _ALIASES:
        raise ValueError(f"simulator {entry.name!r} is registered already")
    REGISTRY[entry.name] = entry
    for a in entry.aliases:
        _ALIASES[a] = entry.name
    return entry


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def canonical(name: str) -> str:
    """The one name of a simulator given its name or an old alias; a one-line error otherwise."""
    name = _ALIASES.get(name, name)
    if name not in REGISTRY:
        raise ConfigError(f"unknown simulated user {name!r} (known: {', '.join(REGISTRY)})")
    return name


def entry(name: str) -> Entry:
    return REGISTRY[canonical(name)]


def runs_in_driver(spec) -> bool:
    """Whether the simulator a spec names may be built in the driver when no remote env runner samples."""
    return entry(spec.kind).in_driver


def choosing() -> tuple[str, ...]:
    """The simulated users that can say whether they would pick a movie (the others only rate)."""
    return tuple(n for n, e in REGISTRY.items() if e.choice)


def choosers_text() -> str:
    """The choosing simulated users, for one-line errors."""
    return ", ".join(n + (" (trained with reward.choice_weight > 0)" if n == "reward_model" else "") for n in choosing())


def chooses(spec) -> bool:
    """Whether the simulator a spec names will choose: its entry has a choice model, and a reward
    model checkpoint was trained with a choice head. A running actor is asked when it is reached."""
    e = entry(spec.kind)
    if spec.kind == "actor":
        return True
    if not e.choice:
        return False
    if spec.kind == "reward_model":
        import json
        from pathlib import Path

        folder = Path(spec.checkpoint)
        meta = folder / "checkpoint" / "config.json" if (folder / "checkpoint").is_dir() else folder / "config.json"
        try:
            return float(json.loads(meta.read_text())["reward"].get("choice_weight", 0.0)) > 0
        except (OSError, ValueError, KeyError):
            return False
    return True


# ------------------------------------------------------------------ builders
def _with_choice(factory, choice: str, train: pd.DataFrame, seed: int):
    """Build the simulator and give it its choice model (rlsim.simulators.choice), fitted on first use."""
    from rlsim.simulators.choice import LazyChoice

    sim = factory()
    sim.choice_model = LazyChoice(choice, train, seed)
    return sim


def _choosing(factory, choice: str, ctx: BuildContext):
    return functools.partial(_with_choice, factory, choice, ctx.train, ctx.seed)


def _baseline(spec, ctx: BuildContext):
    from rlsim.simulators.point import baseline_simulator

    factory = functools.partial(baseline_simulator, spec.kind, ctx.train, ctx.ds.scale, ctx.seed)
    choice = entry(spec.kind).choice
    return _choosing(factory, choice, ctx) if choice else factory


def _load_reward_model(checkpoint: str):
    from rlsim.simulators.reward_model import RewardModelSimulator

    return RewardModelSimulator.load(checkpoint)


def _reward_model(spec, ctx: BuildContext):
    return functools.partial(_load_reward_model, spec.checkpoint)


def _offline_factory(ctx: BuildContext):
    from rlsim.personas.config import PersonaConfig
    from rlsim.simulators.persona import build_offline_persona

    # Whatever backend the `personas:` section names, the in-process persona is the offline one
    # (an LLM pool is its own simulator: llm_persona, or a running actor).
    pcfg = ctx.persona_cfg or PersonaConfig()
    return functools.partial(build_offline_persona, ctx.ds, ctx.train, PersonaConfig(offline=pcfg.offline),
                             ctx.text_model, ctx.cache_dir, ctx.seed)


def _offline_persona(spec, ctx: BuildContext):
    if ctx.persona_cfg is not None and ctx.persona_cfg.backend != "offline":
        raise ConfigError("--reward offline_persona trains against the offline persona; LLM personas are "
                          "--reward llm_persona (or a running simulator actor: --reward actor --reward-actor NAME)")
    return _choosing(_offline_factory(ctx), entry(spec.kind).choice, ctx)


def _build_hybrid(checkpoint: str, options: dict, persona_factory, train: pd.DataFrame | None = None,
                  seed: int = 0):
    from rlsim.config import from_dict
    from rlsim.simulators.choice import LazyChoice
    from rlsim.simulators.hybrid import HybridConfig, HybridSimulator

    opts = dict(options)
    actor = opts.pop("persona_actor", None)
    if actor:
        from rlsim.simulators.actor import SimulatorClient

        persona = SimulatorClient(actor, opts.pop("persona_namespace", None))
    else:
        persona = persona_factory()
    model = _load_reward_model(checkpoint)
    sim = HybridSimulator(model, persona, from_dict(HybridConfig, opts, "hybrid"))
    # Its choice: the reward model's head when it has one, else the persona's (the offline persona
    # picks what its neighbours watched).
    if model.has_choice:
        sim.choice_model = model.choice_model
    elif actor and persona.has_choice:
        sim.choice_model = _ClientChoice(persona)
    elif train is not None:
        sim.choice_model = LazyChoice("neighbours", train, seed)
    return sim


class _ClientChoice:
    """A running simulator actor's choice behind the choice-model interface."""

    name = "actor"

    def __init__(self, client):
        self.client = client

    def probability(self, users, items, sessions=None):
        return self.client.choice(users, items, sessions)


def _hybrid(spec, ctx: BuildContext):
    return functools.partial(_build_hybrid, spec.checkpoint, dict(spec.options), _offline_factory(ctx), ctx.train,
                             ctx.seed)


def _llm_persona(spec, ctx: BuildContext):
    from rlsim.simulators.llm_build import llm_persona_factory

    return llm_persona_factory(ctx.ds, ctx.train, ctx.persona_cfg, ctx.api_key, spec.options, seed=ctx.seed,
                               text_model=ctx.text_model, cache_dir=ctx.cache_dir)


# The bias baseline picks by popularity and activity: the choice every source must beat.
register(Entry("bias", "damped user+item bias, with calibrated ordinal noise per user; picks by popularity",
               _baseline, choice="popularity", in_driver=True))
register(Entry("mf", "matrix factorisation, with calibrated ordinal noise per user; picks by implicit MF (BPR)",
               _baseline, choice="bpr", in_driver=True))
register(Entry("reward_model", "the reward model's softmax; the session joins its history tokens; picks by its "
               "choice head when trained with reward.choice_weight > 0",
               _reward_model, needs=("checkpoint",), aliases=("model",), choice="head", in_driver=True))
register(Entry("offline_persona", "the offline persona: neighbours' ratings and the user's own bias; picks what "
               "its nearest neighbours watched",
               _offline_persona, needs=("persona_config",), aliases=("personas",), choice="neighbours"))
register(Entry("hybrid", "the reward model, asking the persona where it is unsure and distilling the answer; "
               "picks by the reward model's choice head, else the persona's choice",
               _hybrid, needs=("checkpoint", "persona_config"), choice="head or persona"))
register(Entry("llm_persona", "LLM personas through an OpenAI-compatible endpoint (cache, limiter, budget); picks "
               "as Agent4Rec's users: a page of movies, would you watch each now", _llm_persona,
               needs=("persona_config", "endpoint"), choice="llm_page"))
register(Entry("actor", "a simulator already running as a named Ray actor (any of the above)", None,
               needs=("actor",)))
