"""Building the LLM persona simulator anywhere: in this process, or inside a named simulator actor,
as one job at the cluster's limiter with a stable id and a spend ledger (rlsim.simulators.llm)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import pandas as pd

from rlsim.errors import ConfigError
from rlsim.simulators.llm import LLMPersonaSimulator
from rlsim.simulators.llm_config import llm_sim_config
from rlsim.simulators.llm_logprobs import is_integer_scale


def _builder(ds, pcfg, vectors, train: pd.DataFrame):
    from rlsim.personas.source import prompt_builder

    return prompt_builder(ds, train, pcfg, vectors)


# The page choice's settings (added with it) and their defaults.
LATER_OPTIONS = {"page_size": 4, "choice_method": "auto", "choice_epsilon": 0.05}


def simulator_job(spec, options: dict, seed: int, cache_dir: str) -> str:
    """The simulator's job id at the limiter: stable across reruns of the same simulator (endpoint, model,
    options, seed, cache), so a rerun finds its earlier spend instead of starting again at $0."""
    # Options added after ledgers existed name the same job while they keep their defaults, so an
    # upgrade does not hand a simulator a fresh $0 budget.
    options = {k: v for k, v in options.items() if not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}
    ident = {"endpoint": spec.cache_identity(), "options": options, "seed": int(seed),
             "cache_dir": str(Path(cache_dir).expanduser().resolve())}
    return "llm-persona-" + hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def simulator_limiter(pcfg, spec, job: str, ledger: Path) -> tuple[object, dict, Callable | None]:
    """The cluster's limiter of this endpoint and model when Ray is up (registered as ``job``, with the
    budget), else one for this process. ``ledger`` (the job's spend.json, rewritten at every change) holds
    what earlier runs of the same simulator spent: it counts against the budget."""
    from rlsim.personas.limiter import LOCAL_JOB, LocalLimiter, RateLimiter
    from rlsim.personas.journal import SpendLedger

    ledger.parent.mkdir(parents=True, exist_ok=True)
    spent_before = SpendLedger(ledger).read()
    try:
        import ray

        up = ray.is_initialized()
    except ImportError:  # pragma: no cover - ray is a dependency
        up = False
    if not up:
        rl = RateLimiter(pcfg.rpm, pcfg.tpm, pcfg.budget_usd)
        rl.register(LOCAL_JOB, pcfg.rpm, pcfg.tpm, pcfg.budget_usd, spent_before, lease_s=float("inf"),
                    ledger=str(ledger))
        return LocalLimiter(rl), {"scope": "this process", "job": job, "spent_before_usd": spent_before}, None
    from rlsim.personas.limiter import limiter_name
    from rlsim.personas.limiter_actor import RayLimiter, cluster_limiter

    name = limiter_name(spec.base_url, spec.model)
    handle = cluster_limiter(name)
    reg = ray.get(handle.register.remote(job, pcfg.rpm, pcfg.tpm, pcfg.budget_usd, spent_before, None,
                                         str(ledger.resolve())))
    info = {"scope": "cluster", "limiter": name, "job": job, "effective_rpm": reg["rpm"],
            "effective_tpm": reg["tpm"], "other_jobs": reg["other_jobs"], "spent_before_usd": reg["spent_usd"]}

    async def unregister():
        await handle.unregister.remote(job)

    return RayLimiter(handle, job), info, unregister


def build_llm_persona_simulator(ds, train: pd.DataFrame, pcfg, spec, options: dict | None, cache_path: str | None,
                                seed: int = 0, text_model: str = "all-MiniLM-L6-v2",
                                cache_dir: str = "~/.cache/rlsim", limiter=None) -> LLMPersonaSimulator:
    """Build the simulator where it will run (the simulator actor, or this process)."""
    from rlsim.personas.cache import ResponseCache
    from rlsim.personas.engine import RatingEngine

    cfg = llm_sim_config(options)
    vectors = None
    if pcfg.k_similar > 0:
        from rlsim.embeddings import item_text_vectors

        vectors = item_text_vectors(ds.items, text_model, cache_dir)
    make_builder = functools.partial(_builder, ds, pcfg, vectors)
    info, on_close = {"scope": "given"}, None
    if limiter is None:
        job = simulator_job(spec, asdict(cfg), seed, cache_dir)
        ledger = Path(cache_dir).expanduser() / "personas" / "budgets" / f"{job}.json"
        limiter, info, on_close = simulator_limiter(pcfg, spec, job, ledger)
    engine = RatingEngine(spec, pcfg, limiter, ResponseCache(cache_path) if cache_path else None)
    return LLMPersonaSimulator(make_builder(train), engine, ds.scale, cfg, train=train, make_builder=make_builder,
                               seed=seed, limiter_info=info, on_close=on_close)


def llm_persona_factory(ds, train: pd.DataFrame, persona_cfg, api_key: str | None = None,
                        options: dict | None = None, *, seed: int = 0, text_model: str = "all-MiniLM-L6-v2",
                        cache_dir: str = "~/.cache/rlsim") -> Callable[[], LLMPersonaSimulator]:
    """A picklable zero-argument callable building the LLM persona simulator (checked here, at the edge).

    The key is in the BackendSpec only (repr hides it); it reaches the actor as its constructor's argument."""
    from rlsim.personas.backends.factory import check_backend
    from rlsim.personas.stages_common import backend_spec

    if persona_cfg is None:
        raise ConfigError("--reward llm_persona needs the personas: settings (endpoint, model, rpm)")
    pcfg = persona_cfg.validate()
    if pcfg.backend != "openai":
        raise ConfigError(f"--reward llm_persona runs against an OpenAI-compatible endpoint (personas.backend "
                          f"openai), not {pcfg.backend!r}: set --base-url / OPENAI_BASE_URL or personas.backend")
    cfg = llm_sim_config(options)
    if cfg.method == "logprobs" and not is_integer_scale(ds.scale):
        raise ConfigError("llm_persona.method logprobs needs an integer rating scale; use samples, noise or auto")
    spec = backend_spec(pcfg, api_key)
    check_backend(spec)
    cache_path = str(Path(cache_dir).expanduser() / "personas" / "responses.sqlite") if pcfg.cache else None
    return functools.partial(build_llm_persona_simulator, ds, train, pcfg, spec, asdict(cfg), cache_path, seed,
                             text_model, cache_dir)


def start_llm_persona_actor(name: str, ds, train: pd.DataFrame, persona_cfg, api_key: str | None = None,
                            options: dict | None = None, *, namespace: str | None = None, seed: int = 0,
                            text_model: str = "all-MiniLM-L6-v2", cache_dir: str = "~/.cache/rlsim",
                            max_wait_s: float = 0.002):
    """Start a named LLM persona simulator actor (Ray must be up); returns its handle. Stop it with
    ``rlsim.simulators.actor.stop_simulator_actor(handle)`` (closes its client and limiter job)."""
    from rlsim.simulators.actor import start_simulator_actor

    factory = llm_persona_factory(ds, train, persona_cfg, api_key, options, seed=seed, text_model=text_model,
                                  cache_dir=cache_dir)
    return start_simulator_actor(name, factory, namespace, max_wait_s)
