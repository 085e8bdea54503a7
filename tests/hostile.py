"""The hostile server modes of issue 17 and the three properties checked against each of them.

Shared by tests/personas/test_hostile.py (short runs, windows of a few seconds) and bench/persona_pool.py
(the ``hostile`` section: real 60 s windows). Each mode is a ``FaultConfig`` of tests/fake_openai.py
that makes the server disagree with the client; each run has a budget the run would cross.

- spend never exceeds the cap: what the SERVER billed (its log) against the cap;
- requests (and billed tokens) in any window of W seconds stay within limit * W / 60 plus one
  request (the limiter's burst), measured on the server's request log;
- no rating is lost or duplicated: every planned pair is rated (with the right rating) or recorded as
  stopped by the budget (retried on resume), once.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rlsim.personas.backends import BackendSpec
from rlsim.personas.config import PersonaConfig
from rlsim.personas.cost import cost_usd
from rlsim.personas.job import run_rating_job
from tests.fake_openai import FakeOpenAI, FaultConfig, expected_rating

PRICES = {"fake-model": {"prompt": 1000.0, "completion": 1000.0}}  # $0.001 per token: budgets bite fast

# mode -> the server's faults (logprobs without numeric alternatives is another mode, not here).
MODES: dict[str, dict] = {
    "usage_x3": {"usage_factor": 3.0},
    "usage_missing": {"usage_missing": True},
    "reasoning_tokens": {"reasoning_tokens": 250},
    "completions_to_max_tokens": {"fill_max_tokens": True},
    "storm_429": {"storm_period_s": 4.0, "storm_s": 1.5},
    "drip": {"drip_s": 0.5},
}


def billed_usd(server: FakeOpenAI, prices: dict = PRICES) -> float:
    """What the server billed: every answered request at the tokens it counted (reported or not)."""
    return sum(cost_usd(prices, "fake-model", r.prompt_tokens, r.completion_tokens)
               for r in server.log if r.status == 200)


def max_in_window(times: list[float], window_s: float, weights: list[float] | None = None) -> float:
    """The largest total (of ``weights``, default 1 each) of events in any window [t, t + window_s)."""
    pts = sorted(zip(times, weights or [1.0] * len(times)))
    best = total = 0.0
    lo = 0
    for hi, (t, w) in enumerate(pts):
        total += w
        while pts[lo][0] <= t - window_s:
            total -= pts[lo][1]
            lo += 1
        best = max(best, total)
    return best


def lost_and_duplicated(units, rows: pd.DataFrame) -> tuple[int, int]:
    """(lost, duplicated): planned pairs neither rated right nor stopped by the budget; repeated pairs."""
    planned = {(u.user_id, int(i)) for u in units for i in u.item_ids}
    ok = rows[rows["status"] == "ok"]
    right = {(int(u), int(i)) for u, i, r in zip(ok["user_id"], ok["item_id"], ok["rating"])
             if r == expected_rating(int(u), int(i))}
    stopped = {(int(u), int(i)) for u, i in zip(rows.loc[rows["reason"] == "budget", "user_id"],
                                                 rows.loc[rows["reason"] == "budget", "item_id"])}
    return len(planned - right - stopped), int(rows.duplicated(["user_id", "item_id"]).sum())


def cfg_for_mode(rpm: float, tpm: float, budget: float | None, **kw) -> PersonaConfig:
    base = dict(backend="openai", model="fake-model", cache=False, max_retries=10, timeout_s=5.0,
                backoff_base_s=0.05, backoff_max_s=0.5, rpm=rpm, tpm=tpm, max_concurrency=16, n_workers=1,
                shard_users=1000, prices=PRICES, budget_usd=budget)
    base.update(kw)
    return PersonaConfig(**base)


def run_mode(mode: str, units, out_dir: Path, rpm: float, budget: float | None, window_s: float,
             tpm: float = 1e9, **cfg_kw) -> dict:
    """One run of ``units`` against a server in ``mode``; the properties as numbers (budget None: no cap)."""
    with FakeOpenAI(FaultConfig(**MODES[mode])) as srv:
        spec = BackendSpec("openai", "fake-model", srv.base_url, api_key="hostile")
        cfg = cfg_for_mode(rpm, tpm, budget, **cfg_kw)
        s = run_rating_job(units, out_dir, spec, cfg, None, use_ray=False, progress=False)
        rows = pd.read_parquet(Path(out_dir) / "ratings.parquet")
        log = list(srv.log)
    billed = billed_usd(srv)
    lost, dup = lost_and_duplicated(units, rows)
    times = [r.t for r in log]
    answered = [r for r in log if r.status == 200]
    per_window = rpm * window_s / 60
    return {"budget_overrun_usd": max(0.0, billed - budget) if budget is not None else 0.0,
            f"max_{window_s:g}s_rpm_over_limit": max_in_window(times, window_s) / per_window,
            "lost": lost, "duplicated": dup,
            "budget_usd": budget, "billed_usd": billed, "spent_usd_client": s["spent_usd"],
            "requests": len(log), "answered": len(answered), "http_429": sum(r.status == 429 for r in log),
            "max_requests_in_window": max_in_window(times, window_s), "window_s": window_s, "limit_rpm": rpm,
            "max_billed_tokens_in_window": max_in_window([r.t for r in answered], window_s,
                                                         [r.prompt_tokens + r.completion_tokens for r in answered]),
            "rated": s["rated"], "stopped_by_budget": s["failure_reasons"].get("budget", 0),
            "failure_reasons": s["failure_reasons"], "span_s": (max(times) - min(times)) if times else 0.0}
