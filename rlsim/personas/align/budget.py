"""The budget of an alignment run: three stages (the alignment requests, the before and the after
measurement), each with its own spend ledger, under one ``budget_usd``; and the engine of the
alignment requests."""

from __future__ import annotations

from pathlib import Path

from rlsim.personas.journal import SpendLedger


def ledger_spend(path: Path) -> float:
    return SpendLedger(path).read()


def stage_spend(out: Path) -> dict[str, float]:
    after = sum(ledger_spend(p) for p in sorted((out / "after").glob("*/job/spend.json")))
    return {"align": ledger_spend(out / "align" / "spend.json"),
            "before": ledger_spend(out / "before" / "job" / "spend.json"), "after": after}


def stage_cap(budget: float | None, spend: dict[str, float], stage: str) -> float | None:
    """A stage's budget: the run's cap minus what the other stages spent (each stage keeps its own ledger, so
    a stage's cap counts its own earlier spend once, in its ledger)."""
    if budget is None:
        return None
    return max(0.0, float(budget) - sum(v for k, v in spend.items() if k != stage))


def align_engine(cfg, spec, cache_path, use_ray: bool, job: str, ledger: Path, spent_before: float, budget):
    """The engine of the alignment requests: its own job on the limiter, its own ledger (OUT/align/spend.json)."""
    from rlsim.personas.cache import ResponseCache
    from rlsim.personas.engine import RatingEngine
    from rlsim.personas.limiter import LOCAL_JOB, LocalLimiter, RateLimiter, limiter_name
    from rlsim.personas.limiter_actor import RayLimiter, cluster_limiter

    ledger.parent.mkdir(parents=True, exist_ok=True)
    reg = None
    if use_ray:
        import ray

        handle = cluster_limiter(limiter_name(spec.base_url, spec.model))
        reg = ray.get(handle.register.remote(job, cfg.rpm, cfg.tpm, budget, spent_before, None,
                                             str(ledger.resolve())))
        limiter = RayLimiter(handle, job)
    else:
        rl = RateLimiter(cfg.rpm, cfg.tpm, budget)
        rl.register(LOCAL_JOB, cfg.rpm, cfg.tpm, budget, spent_before, lease_s=float("inf"), ledger=str(ledger))
        limiter = LocalLimiter(rl)
    return RatingEngine(spec, cfg, limiter, ResponseCache(cache_path) if cache_path else None), reg
