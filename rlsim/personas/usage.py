"""What persona requests use (requests, cached answers, tokens, dollars, errors per reason), and the
completion sizes dry runs assume."""

from __future__ import annotations

PROFILE_COMPLETION_ESTIMATE = 300  # expected tokens of a psych profile or a Lusifer summary (dry runs only)


def completion_estimate(n_items: int) -> int:
    """Expected completion tokens of a rating answer: for dry runs; reservations use ``gate.request_bound``."""
    return 4 + 7 * n_items  # '"1234": 4,' per item plus braces


def empty_usage() -> dict:
    return {"requests": 0, "cached_requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
            "errors": {}}


def merge_usage(a: dict, b: dict) -> dict:
    out = dict(a)
    for k in ("requests", "cached_requests", "prompt_tokens", "completion_tokens", "cost_usd"):
        out[k] = a.get(k, 0) + b.get(k, 0)
    errs = dict(a.get("errors", {}))
    for k, v in b.get("errors", {}).items():
        errs[k] = errs.get(k, 0) + v
    out["errors"] = errs
    return out
