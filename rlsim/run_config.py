"""The edge: one typed run config, resolved in the order YAML < environment < flags.

The CLI (rlsim.commands.*) and jobs/ call :func:`resolve` once with the YAML file, the environment
(a mapping they read; nothing below ``rlsim/`` reads ``os.environ``) and the flags that were given
(argparse defaults of None, or False for a switch, mean "not given"). Library functions then take
the typed sections of the :class:`RunConfig` they need, never the raw YAML.

The API key is not part of the config (it would reach config dumps): :func:`api_key` reads it from
the same environment mapping and the edge passes it separately.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from rlsim.config import DataConfig, from_dict, load_yaml
from rlsim.errors import ConfigError

if TYPE_CHECKING:
    from rlsim.candidates import CandidatesConfig
    from rlsim.personas.align import AlignConfig
    from rlsim.personas.config import PersonaConfig
    from rlsim.pipeline import PipelineConfig
    from rlsim.policy.config import PolicyConfig
    from rlsim.reward.config import RewardConfig
    from rlsim.study import StudyConfig
    from rlsim.tune import TuneConfig

# YAML section -> (module, dataclass). Imported lazily: `rlsim --help` should not import the stages.
SECTIONS: dict[str, tuple[str, str]] = {
    "data": ("rlsim.config", "DataConfig"),
    "reward": ("rlsim.reward.config", "RewardConfig"),
    "candidates": ("rlsim.candidates", "CandidatesConfig"),
    "policy": ("rlsim.policy.config", "PolicyConfig"),
    "personas": ("rlsim.personas.config", "PersonaConfig"),
    "align": ("rlsim.personas.align", "AlignConfig"),
    "pipeline": ("rlsim.pipeline", "PipelineConfig"),
    "tune": ("rlsim.tune", "TuneConfig"),
    "study": ("rlsim.study", "StudyConfig"),
}
# Simulator option sections, passed as SimulatorSpec.options and checked by their simulator:
# hybrid (rlsim.simulators.hybrid.HybridConfig fields), llm_persona (rlsim.simulators.llm options).
OPTION_SECTIONS = ("hybrid", "llm_persona")


def section_class(name: str) -> type:
    module, cls = SECTIONS[name]
    return getattr(importlib.import_module(module), cls)


def _default(name: str) -> Callable[[], Any]:
    return lambda: section_class(name)()


@dataclass
class RunConfig:
    """Every section of an experiment YAML, typed. ``origin`` says where each non-default value came
    from ("section.field" -> "yaml" | "env" | "flag"); some rules depend on it (see personas_for)."""

    data: DataConfig = field(default_factory=DataConfig)
    reward: "RewardConfig" = field(default_factory=_default("reward"))
    candidates: "CandidatesConfig" = field(default_factory=_default("candidates"))
    policy: "PolicyConfig" = field(default_factory=_default("policy"))
    personas: "PersonaConfig" = field(default_factory=_default("personas"))
    align: "AlignConfig" = field(default_factory=_default("align"))
    pipeline: "PipelineConfig" = field(default_factory=_default("pipeline"))
    tune: "TuneConfig" = field(default_factory=_default("tune"))
    study: "StudyConfig" = field(default_factory=_default("study"))
    hybrid: dict = field(default_factory=dict)
    llm_persona: dict = field(default_factory=dict)
    verbose: bool = False
    origin: dict[str, str] = field(default_factory=dict, repr=False)

    def given(self, key: str, *sources: str) -> bool:
        """Whether "section.field" was set by one of ``sources`` (any source when none are named)."""
        return key in self.origin and (not sources or self.origin[key] in sources)


# ----------------------------------------------------------------------------- flags

def _split_list(value) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s.strip()]


def _weights(value: str) -> dict[str, Any]:
    try:
        pop, sim = (float(x) for x in value.split(","))
    except ValueError:
        raise ConfigError(f"--weights must be POP,SIM (two numbers), got {value!r}") from None
    return {"pop_weight": pop, "sim_weight": sim, "tune_weights": False}


# The reward model's flags: `rlsim reward train --NAME` (dest reward_NAME) -> reward.NAME.
REWARD_FLAGS = {"epochs": int, "lr": float, "batch_size": int, "dim": int, "layers": int, "heads": int,
                "ff_dim": int, "dropout": float, "weight_decay": float, "emb_weight_decay": float, "patience": int,
                "val_frac": float, "mse_weight": float, "label_smoothing": float, "ensemble": int,
                "decay_epochs": int, "device": str, "workers": int}

# flag dest -> the section fields it sets. One dest means one thing in every command.
FLAGS: dict[str, tuple[str, ...]] = {
    **{f: (f"data.{f}",) for f in ("dataset", "split", "data_dir", "cache_dir", "overviews", "text_model")},
    "seed": ("data.seed", "reward.seed", "policy.seed", "personas.seed", "tune.seed"),
    **{f"reward_{n}": (f"reward.{n}",) for n in REWARD_FLAGS},
    "k": ("candidates.k",), "like_threshold": ("candidates.like_threshold",),
    **{f: (f"policy.{f}",) for f in ("iterations", "horizon", "reward_mode", "skip_penalty", "exit_after_skips",
                                     "holdout_users", "num_env_runners", "num_gpus_per_learner")},
    "policy_reward": ("policy.reward",), "num_envs": ("policy.num_envs_per_env_runner",),
    **{f: (f"personas.{f}",) for f in ("model", "base_url", "api_version", "backend", "rpm", "tpm", "max_retries",
                                       "budget_usd", "batch_size", "k_similar", "shard_users")},
    "concurrency": ("personas.max_concurrency",), "timeout": ("personas.timeout_s",),
    "workers": ("personas.n_workers",), "kind": ("personas.profile",),
    **{f: (f"align.{f}",) for f in ("demos", "chunk", "history", "pair_questions", "whatif", "max_lessons",
                                    "validation_frac")},
    **{f: (f"tune.{f}",) for f in ("num_samples", "max_concurrent", "max_epochs", "storage_path", "name")},
    **{f: (f"study.{f}",) for f in ("seeds", "env_steps", "reward_checkpoint")},
    "llm_method": ("llm_persona.method",), "summary_every": ("llm_persona.summary_every",),
}
# Switches (store_true): dest -> (section.field, the value set when given).
SWITCHES: dict[str, tuple[str, Any]] = {
    "no_download": ("data.download", False),
    "no_history": ("reward.history", False),
    "no_history_ratings": ("reward.history_ratings", False),
    "no_user_features": ("reward.user_features", False),
    "calibrate": ("personas.calibrate", True),
    "no_cache": ("personas.cache", False),
}
# Flags whose text is parsed: dest -> (section, parse(value) -> {field: value}).
PARSED: dict[str, tuple[str, Callable[[Any], dict]]] = {
    "weights": ("candidates", _weights),
    "sources": ("study", lambda v: {"sources": _split_list(v)}),
    "stages": ("pipeline", lambda v: {"stages": _split_list(v)}),
}


def config_flags() -> set[str]:
    """Every flag dest that resolve() reads."""
    return set(FLAGS) | set(SWITCHES) | set(PARSED) | {"config", "verbose"}


# ----------------------------------------------------------------------------- environment

def verbose_from(env: Mapping[str, str], flag: bool | None = None) -> bool:
    """--verbose, else $RLSIM_VERBOSE (any non-empty value)."""
    return bool(flag) or bool(env.get("RLSIM_VERBOSE"))


def _env_values(env: Mapping[str, str]) -> dict[str, str]:
    """section.field -> value from the environment (empty variables count as unset)."""
    out = {}
    if env.get("RLSIM_DATA_DIR"):
        out["data.data_dir"] = env["RLSIM_DATA_DIR"]
    if env.get("RLSIM_CACHE_DIR"):
        out["data.cache_dir"] = env["RLSIM_CACHE_DIR"]
    endpoint = env.get("OPENAI_BASE_URL") or env.get("AZURE_OPENAI_ENDPOINT")
    if endpoint:
        out["personas.base_url"] = endpoint
    return out


def api_key(cfg: "PersonaConfig", env: Mapping[str, str]) -> str | None:
    """The persona endpoint's key (Azure's when an api-version is set, else OPENAI_API_KEY); kept out of
    every config object and dump. A non-offline backend with neither endpoint nor key is a ConfigError."""
    key = env.get("AZURE_OPENAI_API_KEY") if cfg.api_version else None
    key = key or env.get("OPENAI_API_KEY")
    if cfg.backend != "offline" and not cfg.base_url and not key:
        raise ConfigError(f"the {cfg.backend} backend needs OPENAI_API_KEY (and OPENAI_BASE_URL for other endpoints)")
    return key


# ----------------------------------------------------------------------------- resolve

def _set(run: RunConfig, key: str, value: Any, source: str) -> None:
    section, name = key.split(".", 1)
    target = getattr(run, section)
    if isinstance(target, dict):
        target[name] = value
    else:
        setattr(target, name, value)
    run.origin[key] = source


def resolve(yaml: str | Path | Mapping | None, env: Mapping[str, str], flags: Mapping[str, Any]) -> RunConfig:
    """The run config: the YAML file (a path, or its already-loaded mapping), then the environment,
    then the flags that were given. Unknown sections and keys are one-line ConfigErrors."""
    sections = dict(load_yaml(yaml) if isinstance(yaml, (str, Path)) else (yaml or {}))
    unknown = sorted(set(sections) - set(SECTIONS) - set(OPTION_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown} (known: {', '.join([*SECTIONS, *OPTION_SECTIONS])})")
    run = RunConfig(**{name: from_dict(section_class(name), sections.get(name), name) for name in SECTIONS})
    for name in OPTION_SECTIONS:
        value = sections.get(name)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {type(value).__name__}")
        setattr(run, name, dict(value or {}))
    for name, values in sections.items():
        for key in values or {}:
            run.origin[f"{name}.{key}"] = "yaml"
    for key, value in _env_values(env).items():
        _set(run, key, value, "env")
    for dest, keys in FLAGS.items():
        if flags.get(dest) is not None:
            for key in keys:
                _set(run, key, flags[dest], "flag")
    for dest, (key, value) in SWITCHES.items():
        if flags.get(dest):
            _set(run, key, value, "flag")
    for dest, (section, parse) in PARSED.items():
        if flags.get(dest) is not None:
            for name, value in parse(flags[dest]).items():
                _set(run, f"{section}.{name}", value, "flag")
    # Derived: Azure's api-version goes with Azure's endpoint; downloads land in the cache.
    p = run.personas
    azure = env.get("AZURE_OPENAI_ENDPOINT")
    if p.api_version is None and azure and p.base_url == azure:
        p.api_version = env.get("OPENAI_API_VERSION") or env.get("AZURE_OPENAI_API_VERSION") or "2024-10-21"
    if run.data.data_dir is None:
        run.data.data_dir = str(Path(run.data.cache_dir).expanduser() / "downloads")
    run.verbose = verbose_from(env, flags.get("verbose"))
    return run


LLM_BACKENDS = ("openai", "tinytroupe")


def personas_for(run: RunConfig, use: str) -> "PersonaConfig":
    """The personas section for one use, validated (a copy; run.personas keeps the backend as given):

    - "pool" (`rlsim personas`, the pipeline's persona stages): backend auto (also when no backend is
      given) is openai when an endpoint is configured, else offline;
    - "llm" (an LLM persona simulator): an LLM is asked, so openai unless an LLM backend is named."""
    cfg = dataclasses.replace(run.personas)
    if use == "pool":
        if cfg.backend == "auto" or not run.given("personas.backend"):
            cfg.backend = "openai" if cfg.base_url else "offline"
    elif use == "llm":
        if cfg.backend not in LLM_BACKENDS:
            cfg.backend = "openai"
    else:
        raise ValueError(f"unknown personas use {use!r}")
    return cfg.validate()


__all__ = ["RunConfig", "resolve", "api_key", "personas_for", "verbose_from", "config_flags", "SECTIONS", "FLAGS"]
